"""Every command has help with an example, and README documents every command (sqlite-utils' test_docs)."""

from __future__ import annotations

from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from detector.cli import main

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def all_commands(group: click.Group, prefix=("detector",)):
    for name, cmd in sorted(group.commands.items()):
        path = (*prefix, name)
        yield path, cmd
        if isinstance(cmd, click.Group):
            yield from all_commands(cmd, path)


COMMANDS = list(all_commands(main))


def test_there_are_commands():
    assert ("detector", "train") in [p for p, _ in COMMANDS]


@pytest.mark.parametrize("path,cmd", COMMANDS, ids=[" ".join(p[1:]) for p, _ in COMMANDS])
def test_command_has_help_with_example(path, cmd):
    result = CliRunner().invoke(main, [*path[1:], "--help"])
    assert result.exit_code == 0, result.output
    assert cmd.help and "Example" in cmd.help, f"{' '.join(path)} needs a docstring with an example"
    if not isinstance(cmd, click.Group):
        assert " ".join(path) in README, f"README.md does not document `{' '.join(path)}`"


def test_top_level_help_lists_commands():
    result = CliRunner().invoke(main, ["--help"])
    assert result.exit_code == 0 and "train" in result.output
