"""Ultralytics' rules that other parts reason with, stated once (checked against ultralytics 8.4).

Pure data and arithmetic, no import of ultralytics, so the record reader and the
reports may use them too. The adapter (detector.yolo) is where they are applied.
"""

from __future__ import annotations

import math

NBS = 64  # nominal batch size: gradients accumulate to about this many images per optimizer step
VAL_BATCH_FACTOR = 2  # the trainer validates at twice the training batch (BaseTrainer: batch_size * 2)
MOSAIC_BOX_FACTOR = 4  # mosaic tiles four images into one, so one image can carry four images' boxes
MIX_BOX_FACTOR = 2  # mixup and cutmix blend a second (possibly mosaic) image in
STRIDE = 32  # the largest stride of YOLO detection heads: image sizes are rounded up to multiples of it

# Our column names for the box metrics Ultralytics reports per validation.
METRIC_KEYS = {"precision": "metrics/precision(B)", "recall": "metrics/recall(B)", "map50": "metrics/mAP50(B)",
               "map50_95": "metrics/mAP50-95(B)"}

# The texts Ultralytics 8.4 treats as running out of device memory (trainer._do_train); matched lower-cased.
MEMORY_ERROR_TEXTS = ("out of memory", "cublas_status_alloc_failed", "cudnn_status_internal_error",
                      "unable to find an engine")


def accumulate(batch: int, nbs: int = NBS) -> int:
    """Iterations per optimizer step: max(round(nbs / batch), 1), as the trainer computes it."""
    return max(round(nbs / batch), 1)


def val_batch(batch: int) -> int:
    """The batch of the validation pass that follows a training epoch at `batch`."""
    return VAL_BATCH_FACTOR * batch


VAL_PAD = 0.5  # validation's rectangular batches are padded by half a stride (Ultralytics' build_yolo_dataset)


def val_batch_shapes(imgsz: int, aspects=(), batch: int = 1, stride: int = STRIDE) -> list[tuple[int, int]]:
    """(height, width) of each of validation's rectangular batches, as Ultralytics' set_rectangle forms them.

    Validation images are sorted by aspect ratio (height / width) and batched in that order; each
    batch is letterboxed to the smallest shape that holds its images, plus half a stride: a set of
    16:9 images at 640 validates at 384 x 672, a square one at 672 x 672. `aspects` are the images'
    height / width ratios; none known: square images.
    """
    ratios, step, out = sorted(aspects) or [1.0], max(batch, 1), []
    for i in range(0, len(ratios), step):
        lo, hi = ratios[i], ratios[min(i + step, len(ratios)) - 1]
        h, w = (hi, 1.0) if hi < 1 else (1.0, 1.0 / lo) if lo > 1 else (1.0, 1.0)
        out.append(tuple(math.ceil(x * imgsz / stride + VAL_PAD) * stride for x in (h, w)))
    return out


def val_batch_shape(imgsz: int, aspects=(), batch: int = 1) -> tuple[int, int]:
    """The largest of validation's batch shapes: the one reserved memory keeps."""
    return max(val_batch_shapes(imgsz, aspects, batch), key=lambda s: s[0] * s[1])


def boxes_per_training_image(densest: int, overrides: dict) -> int:
    """Worst-case boxes on one training image, given the densest image of the dataset and the augmentations."""
    boxes = densest
    if float(overrides.get("mosaic", 1.0) or 0) > 0:
        boxes *= MOSAIC_BOX_FACTOR
    if float(overrides.get("mixup", 0.0) or 0) > 0 or float(overrides.get("cutmix", 0.0) or 0) > 0:
        boxes *= MIX_BOX_FACTOR
    return max(boxes, 1)


def stride_multiple(imgsz: int) -> int:
    """imgsz rounded up to a multiple of the stride, as Ultralytics' check_imgsz does for training."""
    return max(math.ceil(imgsz / STRIDE) * STRIDE, STRIDE)


def largest_training_imgsz(imgsz: int, overrides: dict) -> int:
    """Multi-scale grows images up to imgsz x (1 + multi_scale), stride-aligned."""
    grow = float(overrides.get("multi_scale", 0.0) or 0.0)
    return stride_multiple(math.ceil(imgsz * (1 + grow)))


def is_memory_error_text(text: str) -> bool:
    """True when an error message is one of the device out-of-memory texts."""
    low = text.lower()
    return any(s in low for s in MEMORY_ERROR_TEXTS)
