"""Click options made from the config's declarations: each flag is declared once (detector.config) and shared.

A command lists the options it takes by name (`@options.use("data", "model", ...)`)
and builds its TrainConfig with `options.train_config(params)`; flags, help texts,
types and defaults all come from the dataclass fields, so a new training option is
one field in detector/config.py.
"""

from __future__ import annotations

from pathlib import Path

import click

from detector.config import SWEEP_OPTIONS, BatchOptions, TrainConfig, declared_options, parse_overrides

OVERRIDES_METAVAR = "[KEY=VALUE]..."
# `detector train` takes every declared option, in declaration order: a new field is a new flag there.
TRAIN = tuple(declared_options())
# `detector sweep` takes the options it hands to its runs (config.SWEEP_OPTIONS), and its folder's --project.
SWEEP = (*(name for name in SWEEP_OPTIONS if name != "overrides"), "project")


def param_name(f) -> str:
    """The Click parameter name of a declared field: its flag without dashes (--batch-safety: batch_safety)."""
    return f.metadata["flag"].lstrip("-").replace("-", "_")


def _click_option(f):
    md = f.metadata
    if md.get("negate") or md.get("is_flag"):
        return click.option(md["flag"], param_name(f), is_flag=True, help=md["help"])
    kind = click.Path(path_type=Path) if md.get("path") else md.get("type")
    return click.option(md["flag"], param_name(f), type=kind, default=md.get("text", f.default), help=md["help"],
                        show_default=md.get("show_default", False), metavar=md.get("metavar"))


def use(*names: str, overrides: bool = False):
    """Decorator adding the declared options `names` (TrainConfig fields, batch.<field>) and, if asked, KEY=VALUE."""
    declared = declared_options()
    unknown = [n for n in names if n not in declared]
    if unknown:
        raise KeyError(f"no declared option {unknown[0]!r}; declared: {', '.join(declared)}")

    def decorate(fn):
        if overrides:
            fn = click.argument("overrides", nargs=-1, metavar=OVERRIDES_METAVAR)(fn)
        for name in reversed(names):  # Click lists options in the order the decorators are written
            fn = _click_option(declared[name])(fn)
        return fn

    return decorate


def train_config(params: dict, **extra) -> TrainConfig:
    """The TrainConfig that a command's declared options (and KEY=VALUE words) describe, plus extra fields."""
    kw, batch = {}, {}
    for name, f in declared_options().items():
        key = param_name(f)
        if key not in params:
            continue
        value = not params[key] if f.metadata.get("negate") else params[key]
        if name.startswith("batch."):
            batch[name.removeprefix("batch.")] = value
        else:
            kw[name] = value
    if "overrides" in params:
        kw["overrides"] = parse_overrides(tuple(params["overrides"]))
    if batch:
        base = BatchOptions()
        kw["batch"] = BatchOptions.parse(batch.get("requested", base.requested),
                                         batch.get("candidates", base.candidates), batch.get("safety", base.safety))
    return TrainConfig(**{**kw, **extra})
