"""The `--batch auto` use case: gather the figures, probe the GPU, decide, explain.

batching holds the pure arithmetic and decisions; the adapter (detector.yolo.probe)
measures. This module joins them for a training (`decide`) and for the dry run
`detector batch` (`dry_run`): it finds the worst-case label count of the dataset,
picks the GPU to decide against, runs the probe and records how long it took.
"""

from __future__ import annotations

import logging
import time
from dataclasses import replace
from pathlib import Path

from detector import facts
from detector.config import TrainConfig
from detector.data import datasets
from detector.train import batching

log = logging.getLogger(__name__)


def densest_labels(data: datasets.DatasetInfo) -> int:
    """Boxes in the densest image of the dataset: the dataset check's figure, else counted from the label files."""
    figure = (data.check or {}).get("max_boxes_per_image")
    if figure is not None:
        return int(figure)
    counts = label_counts(data)
    return max((max(c, default=0) for c in counts.values()), default=0)


def label_counts(data: datasets.DatasetInfo) -> dict[str, list[int]]:
    """Boxes per image, per split ("train", "val"); an image without a label file is background (0)."""
    out = {}
    for split in ("train", "val"):
        counts = []
        for image in data.splits.get(split, []):
            try:
                text = datasets.label_path(Path(image)).read_bytes()
            except OSError:
                counts.append(0)
                continue
            counts.append(sum(1 for line in text.splitlines() if line.strip()))
        out[split] = counts
    return out


def box_load(counts: dict[str, list[int]], overrides: dict, seed: int = 0) -> dict[str, int]:
    """Boxes per image the memory model plans with, from the dataset's real counts.

    The loss pads every image of a batch to the batch's densest, and reserved memory keeps the
    largest batch, so what counts is the densest training image of an epoch. With mosaic each training
    image holds four random images' boxes (x2 more with mixup/cutmix): `train` is the densest such
    image over one epoch of draws (median of 5 seeded epochs), `train_high` the four densest images
    together (the worst mosaic possible). Validation images are not augmented: `val` and `val_high`
    are the densest validation image.
    """
    import numpy as np

    train = np.asarray(counts.get("train") or [0])
    val = counts.get("val") or [0]
    tiles = facts.MOSAIC_BOX_FACTOR if float(overrides.get("mosaic", 1.0) or 0) > 0 else 1
    mix = facts.MIX_BOX_FACTOR if (float(overrides.get("mixup", 0.0) or 0) > 0 or
                                   float(overrides.get("cutmix", 0.0) or 0) > 0) else 1
    rng = np.random.default_rng(seed)
    n = len(train)
    epochs = [int(train[rng.integers(0, n, size=(n, tiles * mix))].sum(1).max()) for _ in range(5)]
    high = int(np.sort(train)[::-1][:tiles].sum()) * mix
    return {"train": max(int(np.median(epochs)), 1), "train_high": max(high, 1),
            "val": max(max(val), 1), "val_high": max(max(val), 1)}


def label_load(densest: int, overrides: dict) -> tuple[int, int]:
    """Worst-case boxes per image for (training, validation).

    Mosaic and mixup multiply the densest image's boxes (facts.boxes_per_training_image;
    Ultralytics' AutoBatch uses the same x4); validation images are not augmented. The
    label assigner pads every image to the batch's largest count, so this count on
    every image of the batch is what the loss really allocates.
    """
    return facts.boxes_per_training_image(densest, overrides), max(densest, 1)


def decide(config: TrainConfig, data: datasets.DatasetInfo, device: dict) -> batching.BatchDecision:
    """The batch for a training: explicit as given, 'auto' as 16 on CPU, measured on CUDA."""
    if not config.batch.auto or device.get("type") != "cuda":
        return batching.decide_cpu(config.batch.requested, data.train_images, config.batch.candidates, config.nbs)
    return _probe_and_decide(config, data)


def _probe_and_decide(config: TrainConfig, data) -> batching.BatchDecision:
    from detector.yolo import checks, probe

    opts = config.batch
    gpus = probe.cuda_devices(config.device)
    # Several GPUs each get the same per-GPU batch, so the GPU with the least room decides.
    target = min(gpus, key=lambda g: batching.budget_gb(g["total_memory_gb"], opts.safety, g["baseline_gb"]))
    budget = batching.budget_gb(target["total_memory_gb"], opts.safety, target["baseline_gb"])
    imgsz = facts.largest_training_imgsz(config.imgsz or 640, config.overrides)
    densest = densest_labels(data)
    train_labels, val_labels = label_load(densest, config.overrides)
    name = f"GPU {target['index']} ({target['name']})"
    log.info(f"probing batch sizes {', '.join(map(str, opts.candidates))} on {name} at imgsz {imgsz} with "
             f"{train_labels} boxes per training image (densest image: {densest})...")
    model = checks.check_model(config.model)
    load = box_load(label_counts(data), config.overrides)
    aspects = datasets.image_aspects(data.splits.get("val", []))  # validation's batch shapes
    predicted = predicted_peaks(config, model, len(data.names), imgsz, densest, opts.candidates, load,
                                gpu=target["name"], val_aspects=aspects)
    skipped = skip_by_prediction(predicted, budget)
    for c in skipped:
        log.info(f"not probing batch {c}: the memory model predicts {predicted[c]:.2f} GB, over {SKIP_FACTOR:g} x the "
                 f"{budget:.2f} GB budget")
    started = time.perf_counter()
    measured = probe.probe_batch_memory(
        model, len(data.names), imgsz, [c for c in opts.candidates if c not in skipped], target["index"],
        train_labels, val_labels, config.overrides.get("amp", True), stop_above_gb=budget, val_aspects=aspects)
    seconds = time.perf_counter() - started
    decision = batching.decide_gpu([batching.Measurement(**m) for m in measured], target["total_memory_gb"],
                                   opts.safety, opts.candidates, data.train_images, config.nbs, devices=len(gpus),
                                   baseline_gb=target["baseline_gb"], device_name=name, imgsz=imgsz)
    decision = with_predictions(decision, predicted, skipped)
    return replace(decision, probe={
        "device": name, "devices": len(gpus), "total_memory_gb": round(target["total_memory_gb"], 3),
        "baseline_gb": round(target["baseline_gb"], 3), "safety_fraction": opts.safety,
        "budget_gb": round(budget, 3), "imgsz": imgsz, "densest_image_boxes": densest,
        "train_boxes_per_image": train_labels, "val_boxes_per_image": val_labels, "seconds": round(seconds, 2)})


# The probe skips a candidate whose predicted peak exceeds the budget by this factor: far outside the
# model's error (within 20% of published figures), so the probe would only spend a failed step on it.
SKIP_FACTOR = 1.5


def predicted_peaks(config: TrainConfig, model: str, nc: int, imgsz: int, densest: int, candidates,
                    load: dict | None = None, gpu: str = "", val_aspects: tuple = ()) -> dict[int, float]:
    """The memory model's upper bound of reserved GiB per candidate (any epoch), or {} when it cannot run."""
    try:
        settings = memory_settings(config, model, nc, imgsz, densest, load, gpu=gpu, val_aspects=val_aspects)
        return {p.batch: p.peak_gb_high for p in predict_candidates(settings, candidates)}
    except Exception as e:  # noqa: BLE001  the prediction only advises the probe: never fail a training over it
        log.info(f"memory model unavailable ({type(e).__name__}: {e}); probing every candidate")
        return {}


def memory_settings(config: TrainConfig, model: str, nc: int, imgsz: int, densest: int, load: dict | None = None,
                    train_images: int = 0, val_images: int = 0, gpu: str = "", val_aspects: tuple = ()):
    """The memory model's settings for a training config: amp, optimizer and the label load.

    `load` is box_load's figures from the dataset's real counts; without it every image carries the
    densest image's boxes (x4 for mosaic), typical and worst alike, as the probe assumes.
    `val_aspects` are the validation images' height / width, which set validation's batch shapes
    (none: square images, the largest).
    """
    from detector.yolo import memory

    train_boxes, val_boxes = label_load(densest, config.overrides)
    load = load or {"train": train_boxes, "train_high": train_boxes, "val": val_boxes, "val_high": val_boxes}
    return memory.MemorySettings(model=model, nc=nc, imgsz=imgsz, amp=memory.parse_amp(config.overrides.get("amp", True)),
                                 optimizer=memory.parse_optimizer(config.overrides.get("optimizer", "auto")),
                                 train_boxes=load["train"], val_boxes=load["val"], nbs=config.nbs,
                                 train_boxes_high=load["train_high"], val_boxes_high=load["val_high"],
                                 train_images=train_images, val_images=val_images, gpu=gpu,
                                 val_aspects=tuple(val_aspects))


def predict_candidates(settings, candidates) -> list:
    """The memory model's prediction per candidate batch (one model build)."""
    from detector.yolo import memory

    model = memory.MemoryModel(settings)
    return [model.predict(b) for b in sorted(candidates)]


def skip_by_prediction(predicted: dict[int, float], budget_gb: float) -> set[int]:
    """Candidates whose upper bound is above SKIP_FACTOR x the budget, and every larger one (memory grows with batch)."""
    over = [c for c, gb in predicted.items() if gb > SKIP_FACTOR * budget_gb]
    return {c for c in predicted if over and c >= min(over)}


def with_predictions(decision: batching.BatchDecision, predicted: dict[int, float], skipped) -> batching.BatchDecision:
    """The decision table with each candidate's predicted peak beside its measurement, skipped ones said so."""
    rows = []
    for r in decision.table:
        c = r.per_device_batch if r.per_device_batch is not None else r.batch
        gb = predicted.get(c)
        row = replace(r, predicted_peak_gb=None if gb is None else round(gb, 3))
        if c in skipped:
            row = replace(row, note=f"not probed: predicted {gb:.2f} GB, over {SKIP_FACTOR:g} x the budget")
        rows.append(row)
    return replace(decision, table=rows)


def describe(decision: batching.BatchDecision) -> str:
    """The decision as the user reads it: the table, then which batch and why."""
    lines = [batching.table_text(decision)]
    if decision.probe:
        p = decision.probe
        lines.append(f"probe: {p['seconds']:.1f} s on {p['device']}, budget {p['safety_fraction']:.0%} of "
                     f"{p['total_memory_gb']:.1f} GB" + (f" minus {p['baseline_gb']:.2f} GB in use" if p['baseline_gb']
                                                          else "") + f" = {p['budget_gb']:.2f} GB")
    lines.append(f"batch {decision.chosen}: {decision.reason}")
    return "\n".join(lines)


def dry_run(config: TrainConfig) -> batching.BatchDecision:
    """`detector batch`: what `detector train` with the same options would choose, without training."""
    from detector.train.preflight import prepare
    from detector.yolo import checks

    config, data, _ = prepare(config)
    device = checks.device_info(config.device)
    log.info(f"dataset {data.yaml}: {data.train_images} training images, {data.val_images} validation images")
    where = "CPU" if device["type"] == "cpu" else f"{device['name']} ({device['total_memory_gb']:.1f} GB)"
    log.info(f"model {config.model} at imgsz {config.imgsz or 640} on {where}, nbs {config.nbs}")
    decision = decide(config, data, device)
    log.info(describe(decision))
    log.info(batching.explain(data.train_images, config.nbs))
    return decision
