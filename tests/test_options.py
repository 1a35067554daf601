"""Every training option is declared once (detector.config) and survives config -> argv -> config and run.json."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from detector import options
from detector.cli import main
from detector.config import BatchOptions, TrainConfig, declared_options

# A value unlike the default for every declared option: a new option fails here until it has one.
SAMPLES = {
    "data": Path("some/data.yaml"), "model": "yolov8s.yaml", "download": True, "epochs": 7, "imgsz": 96,
    "batch.requested": 32, "device": "cpu", "workers": 2, "seed": 3, "name": "b32", "project": Path("elsewhere"),
    "resume": Path("runs/old"), "augment": "light", "batch.candidates": (8, 16), "batch.safety": 0.5,
    "tensorboard": True, "grad_stats": False, "mlflow": "sqlite:///mlflow.db",
}
OVERRIDES = {"lr0": 0.01, "optimizer": "SGD", "mosaic": 0.0, "close_mosaic": 0, "cache": "disk", "amp": False,
             "label": "true", "number_as_text": "0.5", "empty": None, "scales": [0.5, 1.0]}


def _with(config: TrainConfig, name: str, value) -> TrainConfig:
    if name.startswith("batch."):
        return replace(config, batch=replace(config.batch, **{name.removeprefix("batch."): value}))
    return replace(config, **{name: value})


def _parsed(argv: list[str]) -> TrainConfig:
    """What `detector train ARGV` builds, through Click and the shared options."""
    # The group's help names, as `detector train` has them: Click caches the help option on the command.
    ctx = main.commands["train"].make_context("train", list(argv), help_option_names=["-h", "--help"])
    return options.train_config(ctx.params)


def test_every_declared_option_has_a_sample_and_is_on_train():
    assert set(declared_options()) == set(SAMPLES)
    flags = {o for p in main.commands["train"].params for o in p.opts}
    assert {f.metadata["flag"] for f in declared_options().values()} <= flags


@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_option_round_trips_through_argv(name):
    config = _with(TrainConfig(), name, SAMPLES[name])
    argv = config.to_argv()
    assert argv and argv[0] == declared_options()[name].metadata["flag"]
    assert _parsed(argv) == config


def test_all_options_and_overrides_round_trip_together():
    config = TrainConfig(overrides=dict(OVERRIDES))
    for name, value in SAMPLES.items():
        config = _with(config, name, value)
    assert _parsed(config.to_argv()) == config
    assert TrainConfig().to_argv() == []  # defaults say nothing


def test_run_json_config_round_trips():
    config = TrainConfig(data=Path("d.yaml"), epochs=3, batch=BatchOptions(16, (16, 32), 0.7), command=("detector",),
                         overrides=dict(OVERRIDES), grad_stats=False)
    assert TrainConfig.from_record(config.record()) == config


def test_to_argv_keeps_only_what_is_asked():
    config = TrainConfig(epochs=3, seed=2, overrides={"lr0": 0.1})
    assert config.to_argv(only=["epochs", "overrides"]) == ["--epochs", "3", "lr0=0.1"]
    assert config.to_argv(skip=["overrides", "seed"]) == ["--epochs", "3"]
