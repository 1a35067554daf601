"""The docs hold: every command has help with an example and a README entry (sqlite-utils' test_docs),
docs/cli.md is the CLI's current help, and every path and detector.* name the docs mention exists."""

from __future__ import annotations

import ast
import importlib.util
import io
import re
import tokenize
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


# ---- docs/cli.md is the CLI's own help ------------------------------------------------------------------------

ROOT = Path(__file__).resolve().parents[1]


def _tool(name: str):
    """A script from tools/ as a module (tools are scripts, not a package on sys.path)."""
    spec = importlib.util.spec_from_file_location(f"tools_{name}", ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cli_md_is_current():
    gen = _tool("gen_cli_docs")
    current = (ROOT / "docs" / "cli.md").read_text(encoding="utf-8")
    assert current == gen.render(), "docs/cli.md is out of date: run `python tools/gen_cli_docs.py`"


def test_cli_md_has_every_command():
    text = (ROOT / "docs" / "cli.md").read_text(encoding="utf-8")
    for path, _ in COMMANDS:
        assert f"\n## {' '.join(path)}\n" in text


# ---- every path and detector.* name the docs mention exists -----------------------------------------------------

# A repository path: one of these folders, then a path ending in a known extension or "/". Not preceded by a
# word character, "/", "." or "~", so runs/..., ~/.cache/detector/datasets/ and $DETECTOR_HOME/datasets/ are
# not read as repository paths.
PATH_RE = re.compile(r"(?<![\w./~$-])((?:detector|docs|tools|tests|datasets)/(?:[\w.-]+/)*"
                     r"(?:[\w-]+\.(?:py|md|yaml|yml|json|txt|toml|cfg|csv|sh))?)(?![\w/-])")
NAME_RE = re.compile(r"(?<![\w./-])detector(?:\.[A-Za-z_]\w*)+")


def _doc_texts():
    """(where, text) for README.md, docs/*.md, tools/README.md, and every docstring and comment under detector/."""
    for md in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "tools" / "README.md"]:
        if md.exists():
            yield md.relative_to(ROOT).as_posix(), md.read_text(encoding="utf-8")
    for py in sorted((ROOT / "detector").rglob("*.py")):
        rel, src = py.relative_to(ROOT).as_posix(), py.read_text(encoding="utf-8")
        for node in ast.walk(ast.parse(src)):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node, clean=False)
                if doc:
                    yield f"{rel}:{node.body[0].lineno}", doc
        for tok in tokenize.generate_tokens(io.StringIO(src).readline):
            if tok.type == tokenize.COMMENT:
                yield f"{rel}:{tok.start[0]}", tok.string


def _top_level_names(tree: ast.AST) -> dict[str, ast.AST]:
    names: dict[str, ast.AST] = {}
    for node in getattr(tree, "body", []):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names[node.name] = node
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            for target in node.targets if isinstance(node, ast.Assign) else [node.target]:
                for n in ast.walk(target):
                    if isinstance(n, ast.Name):
                        names[n.id] = n
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            for alias in node.names:
                names[(alias.asname or alias.name).split(".")[0]] = node
        elif isinstance(node, (ast.If, ast.Try)):  # names defined under `if TYPE_CHECKING:` or try/except
            names.update(_top_level_names(node))
            for handler in getattr(node, "handlers", []):
                names.update(_top_level_names(handler))
    return names


def _resolves(dotted: str) -> bool:
    """detector.a.b.Name.attr: modules by file, then names defined in the module's source (read, not imported)."""
    parts = dotted.split(".")
    here = ROOT / parts[0]
    i = 1
    while i < len(parts) and ((here / parts[i]).is_dir() or (here / f"{parts[i]}.py").is_file()):
        here = here / parts[i] if (here / parts[i]).is_dir() else here / f"{parts[i]}.py"
        i += 1
    source = here / "__init__.py" if here.is_dir() else here
    if not source.is_file():
        return False
    node: ast.AST = ast.parse(source.read_text(encoding="utf-8"))
    for attr in parts[i:]:
        names = _top_level_names(node)
        if attr not in names:
            return False
        node = names[attr]
    return True


def _mentions():
    for where, text in _doc_texts():
        for m in PATH_RE.finditer(text):
            yield where, "path", m.group(1)
        for m in NAME_RE.finditer(text):
            yield where, "name", m.group(0)


def test_every_mentioned_path_and_name_exists():
    missing = sorted({f"{where}: {what}" for where, kind, what in _mentions()
                      if not ((ROOT / what).exists() if kind == "path" else _resolves(what))})
    assert missing == [], "the docs mention paths or names that do not exist:\n" + "\n".join(missing)


def test_the_mention_finder_reads_what_it_should():
    text = ("see detector/report/render.py, docs/cli.md#x and detector/yolo/fastload/ or detector.yolo.memory; "
            "not runs/demo/x.py, ~/.cache/detector/datasets/, $DETECTOR_HOME/datasets/ or my/tools/x.py.")
    assert [m.group(1) for m in PATH_RE.finditer(text)] == [
        "detector/report/render.py", "docs/cli.md", "detector/yolo/fastload/"]
    assert [m.group(0) for m in NAME_RE.finditer(text)] == ["detector.yolo.memory"]
    assert _resolves("detector.yolo.memory") and _resolves("detector.config.TrainConfig")
    assert not _resolves("detector.yolo.nothing") and not _resolves("detector.config.NoSuchName")


def test_architecture_lists_every_module():
    """docs/architecture.md's layout names every module and subpackage of detector/, so it cannot fall behind."""
    text = (ROOT / "docs" / "architecture.md").read_text(encoding="utf-8")
    missing = []
    for path in sorted((ROOT / "detector").rglob("*.py")):
        name = path.parent.name + "/" if path.name == "__init__.py" else path.name
        if path.parent == ROOT / "detector" and path.name == "__init__.py":
            continue
        if not re.search(rf"(?<![\w/.]){re.escape(name)}(?![\w])", text):
            missing.append(path.relative_to(ROOT).as_posix())
    assert missing == [], f"docs/architecture.md does not mention: {', '.join(missing)}"
