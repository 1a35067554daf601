"""Pre-flight: every check that can fail on bad input, before any run folder exists."""

from __future__ import annotations

from dataclasses import replace

from detector import runtime
from detector.config import TrainConfig, check_options, with_builtin_defaults
from detector.data import spec as datasets
from detector.data import synth


def prepare(config: TrainConfig, echo=print) -> tuple[TrainConfig, datasets.DatasetInfo, str]:
    """Check every option, the model and the dataset, as `train` does before creating a run folder.

    Returns the config with the built-in demo's defaults applied, the checked
    dataset and the model spec Ultralytics will load. Shared by `train`,
    `detector batch` and the benchmarks.
    """
    check_options(config)
    from detector.yolo import checks  # imports ultralytics: after the cheap checks

    # A cfg=FILE becomes plain KEY=VALUE arguments before the demo's defaults fill the gaps.
    config = with_builtin_defaults(replace(config, overrides=checks.expand_cfg(config.overrides)))

    checks.check_overrides(config.overrides)
    model = checks.check_model(config.model)  # refused before the dataset is read
    return config, dataset(config, echo), model


def dataset(config: TrainConfig, echo) -> datasets.DatasetInfo:
    """The dataset, checked (cached by fingerprint): one with errors is refused before any run folder exists."""
    from detector.data import check

    return check.require_trainable(_load_dataset(config, echo), echo)


def _load_dataset(config: TrainConfig, echo) -> datasets.DatasetInfo:
    if config.data is not None:
        return datasets.load(config.data)
    spec = synth.SynthSpec(seed=0)
    shown = [0]

    def progress(done, total):
        pct = done * 100 // total
        if pct >= shown[0] + 25 or done == total:
            shown[0] = pct
            echo(f"  generating built-in dataset: {done}/{total} images")

    return datasets.load(synth.ensure(spec, runtime.datasets_cache(), progress))
