"""`detector batch --gpu-memory`: the --batch auto decision for GPUs you do not have.

The memory model (detector.yolo.memory) predicts each candidate's peak reserved
memory for training and for validation at twice the batch; the decision is the
very function `--batch auto` uses on CUDA (batching.decide_gpu), fed with those
predictions and the CUDA context the model adds outside reserved memory.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field, replace

from detector import facts
from detector.config import TrainConfig, parse_list
from detector.data import datasets
from detector.errors import BatchError, UsageError
from detector.train import batching

log = logging.getLogger(__name__)


def parse_gpu_sizes(text: str) -> tuple[float, ...]:
    """'8,16,24' to GPU memory sizes in GB (GiB, as the GPU reports them); anything not positive is refused."""
    return parse_list(text, "--gpu-memory", cast=float, minimum=1e-9, as_set=True, unit="GB",
                      what="GPU memory sizes in GB", example="8,16,24")


def check_counts(classes: int | None, boxes: int | None) -> None:
    """--classes and --boxes-per-image, when given, must be at least 1."""
    if classes is not None and classes < 1:
        raise UsageError(f"--classes must be at least 1, not {classes}")
    if boxes is not None and boxes < 1:
        raise UsageError(f"--boxes-per-image must be at least 1 (boxes on the densest image), not {boxes}")


@dataclass(frozen=True)
class GpuPlan:
    """Predictions per candidate, and per GPU size the batch --batch auto would choose."""

    candidates: list  # memory.MemoryPrediction per candidate batch
    context_gb: float
    sizes: tuple
    safety: float
    decisions: dict = field(default_factory=dict)  # GPU size -> BatchDecision, or the reason nothing fits
    settings: dict = field(default_factory=dict)

    @property
    def chosen(self) -> dict:
        return {_key(s): (d.chosen if isinstance(d, batching.BatchDecision) else None)
                for s, d in self.decisions.items()}

    def to_json(self) -> dict:
        """The --json object: candidates with predicted GiB and fits per size, context_gb, chosen per size."""
        rows = []
        for p in self.candidates:
            fits = {_key(s): _fits(self.decisions[s], p.batch) for s in self.sizes}
            rows.append({"batch": p.batch, "predicted_train_gb": round(p.train_gb, 3),
                         "predicted_val_gb": round(p.val_gb, 3), "predicted_peak_gb": round(p.peak_gb, 3),
                         "predicted_train_gb_high": round(p.train_gb_high, 3),
                         "predicted_val_gb_high": round(p.val_gb_high, 3),
                         "predicted_peak_gb_high": round(p.peak_gb_high, 3), "high_causes_gb": p.causes,
                         "predicted_train_allocated_gb": round(p.train_allocated_gb, 3),
                         "predicted_val_allocated_gb": round(p.val_allocated_gb, 3),
                         "breakdown_gb": p.breakdown, "fits": fits, "seconds": p.seconds})
        reasons = {_key(s): (d.reason if isinstance(d, batching.BatchDecision) else d) for s, d in self.decisions.items()}
        return {"candidates": rows, "context_gb": self.context_gb, "chosen": self.chosen, "reasons": reasons,
                "batch_safety": self.safety, "settings": self.settings}


def _key(size: float) -> str:
    return f"{size:g}"


def _fits(decision, batch: int) -> bool:
    if not isinstance(decision, batching.BatchDecision):
        return False
    return any(r.per_device_batch == batch and r.fits for r in decision.table)


def plan(config: TrainConfig, sizes, classes: int | None = None, boxes: int | None = None) -> GpuPlan:
    """Predict every candidate's memory and decide per GPU size, as --batch auto would on that GPU."""
    from detector.train import autobatch

    check_counts(classes, boxes)
    names, n_images, densest, config, model, load, aspects = _dataset_facts(config, classes, boxes)
    opts = config.batch
    imgsz = facts.largest_training_imgsz(config.imgsz or 640, config.overrides)
    settings = autobatch.memory_settings(config, model, classes or len(names), imgsz, densest, load,
                                         val_aspects=aspects)
    if not n_images:
        log.info(f"--classes {classes} and --boxes-per-image {boxes} given: the dataset is not read")
    val_shape = facts.val_batch_shape(imgsz, aspects, facts.val_batch(max(opts.candidates)))
    where = ("the densest training image of an epoch, from the dataset's counts" if load else
             f"{densest} on the densest image{', x4 for mosaic' if settings.train_boxes > densest else ''}")
    log.info(f"model {config.model} at imgsz {imgsz}, {settings.nc} classes, {settings.train_boxes} boxes per training "
             f"image ({where}; worst {settings.train_boxes_high}), amp {settings.amp}, optimizer {settings.optimizer}, "
             f"validation batches up to {'x'.join(map(str, val_shape))} ("
             f"{'from the validation images' if aspects else 'square images assumed, the largest'}): "
             f"predicting {len(opts.candidates)} candidates...")
    started = time.perf_counter()
    predictions = autobatch.predict_candidates(settings, opts.candidates)
    seconds = time.perf_counter() - started
    from detector.yolo.memory import CUDA_CONTEXT_GB

    decisions = {s: decide_for_size(predictions, s, opts.safety, opts.candidates, n_images, config.nbs, imgsz)
                 for s in sizes}
    info = {"model": config.model, "imgsz": imgsz, "classes": settings.nc, "densest_image_boxes": densest,
            "train_boxes_per_image": settings.train_boxes, "val_boxes_per_image": settings.val_boxes,
            "train_boxes_per_image_high": settings.train_boxes_high, "box_statistics": "dataset" if load else "densest",
            "amp": settings.amp, "optimizer": settings.optimizer, "train_images": n_images,
            # validation's largest rectangular batch at the largest candidate: from the images' shapes, or square
            "val_batch_shape": list(val_shape),
            "val_shapes": "dataset" if aspects else "square",
            "seconds": round(seconds, 2)}
    return GpuPlan(predictions, CUDA_CONTEXT_GB, tuple(sizes), opts.safety, decisions, info)


def decide_for_size(predictions, size: float, safety: float, candidates, n_images: int, nbs: int, imgsz: int):
    """batching.decide_gpu on a GPU of `size` GB fed with the upper bounds; the error text when nothing fits.

    The bound, not the typical figure, decides: a typical figure that fits can still run out of memory
    in the epoch with the densest batches.
    """
    from detector.yolo.memory import CUDA_CONTEXT_GB

    measured = [batching.Measurement(p.batch, max(p.train_gb_high, p.train_gb), max(p.val_gb_high, p.val_gb), None,
                                     max(p.train_allocated_gb, p.val_allocated_gb)) for p in predictions]
    try:
        return batching.decide_gpu(measured, size, safety, candidates, n_images, nbs, baseline_gb=CUDA_CONTEXT_GB,
                                   device_name=f"a {size:g} GB GPU", imgsz=imgsz, basis="predicted")
    except BatchError as e:
        return str(e)


def _dataset_facts(config: TrainConfig, classes, boxes):
    """Class names, training images, the densest image's boxes, the box load and validation images' height / width.

    The dataset is not read when --classes and --boxes-per-image are both given.
    """
    from detector.train import autobatch
    from detector.train.preflight import prepare

    if classes is not None and boxes is not None:
        from detector.config import check_options
        from detector.yolo import checks

        check_options(config)
        # A plan for the user's own dataset, which need not exist yet: Ultralytics' defaults (mosaic on,
        # nbs 64, imgsz 640), not the built-in demo's (mosaic off, nbs 16, imgsz 128).
        config = replace(config, overrides=checks.expand_cfg(config.overrides))
        checks.check_overrides(config.overrides)
        model = checks.check_model(config.model)
        return [str(i) for i in range(classes)], 0, boxes, config, model, None, ()
    config, data, model = prepare(config)
    load = None
    if boxes is None:  # the dataset's real counts: the densest image, and what mosaic makes of the distribution
        load = autobatch.box_load(autobatch.label_counts(data), config.overrides)
    densest = boxes if boxes is not None else autobatch.densest_labels(data)
    log.info(f"dataset {data.yaml}: {data.train_images} training images, {len(data.names)} classes, "
             f"densest image {densest} boxes")
    aspects = datasets.image_aspects(data.splits.get("val", []))
    return list(data.names), data.train_images, densest, config, model, load, aspects


def describe(result: GpuPlan) -> str:
    """The plan as text: typical - worst GiB per candidate, fits per GPU size, what drives the worst, the choice."""
    sizes = [f"{s:g} GB" for s in result.sizes]
    head = ["batch", "train GB", "val GB (2x)", "peak GB (typical - worst)", *sizes]
    lines = [head]
    doc = result.to_json()
    for row in doc["candidates"]:
        lines.append([str(row["batch"]), _span(row["predicted_train_gb"], row["predicted_train_gb_high"]),
                      _span(row["predicted_val_gb"], row["predicted_val_gb_high"]),
                      _span(row["predicted_peak_gb"], row["predicted_peak_gb_high"]),
                      *("fits" if row["fits"][_key(s)] else "no" for s in result.sizes)])
    widths = [max(len(r[i]) for r in lines) for i in range(len(head))]
    out = ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in lines]
    if doc["candidates"]:
        top = doc["candidates"][-1]
        causes = ", ".join(f"{k} +{v:.2f}" for k, v in top["high_causes_gb"].items() if v >= 0.005)
        gap = top["predicted_peak_gb_high"] - top["predicted_peak_gb"]
        out.append(f"worst - typical peak at batch {top['batch']}: +{gap:.2f} GB = {causes or 'nothing'} "
                   "(the fit test uses the worst)")
    out.append(f"GB are GiB of reserved memory (torch.cuda.memory_reserved); the fit test adds {result.context_gb:.2f} "
               f"GB of CUDA context and allows {result.safety:.0%} of each GPU")
    for s, d in result.decisions.items():
        out.append(f"{s:g} GB: " + (f"batch {d.chosen}" if isinstance(d, batching.BatchDecision) else f"none ({d})"))
    return "\n".join(out)


def _span(typical: float, high: float) -> str:
    return f"{typical:.2f} - {high:.2f}"
