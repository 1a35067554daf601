"""Pre-flight: every check that can fail on bad input, before any run folder exists."""

from __future__ import annotations

import logging
from dataclasses import replace

from detector import runtime
from detector.config import TrainConfig, check_options, with_builtin_defaults
from detector.data import datasets
from detector.data import synth

log = logging.getLogger(__name__)


def prepare(config: TrainConfig) -> tuple[TrainConfig, datasets.DatasetInfo, str]:
    """Check every option, the model and the dataset, as `train` does before creating a run folder.

    Returns the config with the built-in demo's defaults applied, the checked
    dataset and the model spec Ultralytics will load. Shared by `train`,
    `detector batch` and the benchmarks.
    """
    check_options(config)
    from detector.yolo import checks  # imports ultralytics: after the cheap checks

    # A cfg=FILE becomes plain KEY=VALUE arguments before the demo's defaults fill the gaps.
    config = with_builtin_defaults(replace(config, overrides=checks.expand_cfg(config.overrides)))
    config = _stride_imgsz(config)

    checks.check_overrides(config.overrides)
    from detector.weights import cache as weights_cache

    source = weights_cache.resolve(config.model, config.download)  # yolo11n.pt: cached, or fetched if asked
    if source is not None:
        config = replace(config, weights=source)  # run.json's config records path, URL and sha256
    config = _pretrained_from_cache(config)
    model = checks.check_model(source["path"] if source else config.model)  # refused before the dataset is read
    return config, dataset(config), model


def _pretrained_from_cache(config: TrainConfig) -> TrainConfig:
    """pretrained=NAME.pt follows the weights-cache rules of --model: Ultralytics would download a missing one."""
    from detector.errors import ModelError
    from detector.weights import cache as weights_cache

    name = config.overrides.get("pretrained")
    if not (isinstance(name, str) and name.endswith(".pt")):
        return config
    source = weights_cache.resolve(name, config.download)
    if source is None:
        raise ModelError(f"pretrained={name}: no such weights file; give a local .pt or an Ultralytics asset name")
    return replace(config, overrides={**config.overrides, "pretrained": source["path"]})


def _stride_imgsz(config: TrainConfig) -> TrainConfig:
    """--imgsz as Ultralytics will train it (rounded up to the stride), said when it differs from what was asked."""
    from detector import facts

    if config.imgsz is None or config.imgsz == facts.stride_multiple(config.imgsz):
        return config
    used = facts.stride_multiple(config.imgsz)
    log.info(f"--imgsz {config.imgsz} is not a multiple of the model's stride {facts.STRIDE}: training at {used}")
    return replace(config, imgsz=used, imgsz_requested=config.imgsz)


def dataset(config: TrainConfig) -> datasets.DatasetInfo:
    """The dataset, checked (cached by fingerprint): one with errors is refused before any run folder exists."""
    from detector.data import check

    return check.require_trainable(_load_dataset(config))


def _load_dataset(config: TrainConfig) -> datasets.DatasetInfo:
    if config.data is not None:
        return datasets.load(config.data)
    spec = synth.SynthSpec(seed=0)
    shown = [0]

    def progress(done, total):
        pct = done * 100 // total
        if pct >= shown[0] + 25 or done == total:
            shown[0] = pct
            log.info(f"  generating built-in dataset: {done}/{total} images")

    return datasets.load(synth.ensure(spec, runtime.datasets_cache(), progress))
