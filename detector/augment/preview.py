"""Preview: one augmented training batch, as the trainer's loader yields it, drawn as a grid.

The batch comes from Ultralytics' own training dataset and loader (mosaic,
perspective, the Albumentations pipeline, HSV, flips) built with the same
hyperparameters training would use, seeded the way the trainer seeds itself, so
the same seed always gives the same grid.
"""

from __future__ import annotations

import math
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from detector import fileio, paths, runtime
from detector.augment import pipelines as augment
from detector.data import datasets
from detector.data import synth
from detector.errors import UsageError

# Distinct BGR colours for class ids (cycled).
_PALETTE = [(56, 56, 255), (151, 157, 255), (31, 112, 255), (29, 178, 255), (49, 210, 207), (10, 249, 72),
            (23, 204, 146), (134, 219, 61), (52, 147, 26), (187, 212, 0), (168, 153, 44), (255, 194, 0),
            (147, 69, 52), (255, 115, 100), (236, 24, 0), (255, 56, 132), (133, 0, 82), (255, 56, 203)]


@dataclass(frozen=True)
class PreviewRequest:
    """What to preview: the options of `detector augment preview`."""

    out: Path
    data: Path | None = None  # None: the built-in dataset, with train's demo settings
    augment: str | None = None  # preset or A.save file; None: Ultralytics' default set
    batch: int = 16
    seed: int = 0
    imgsz: int | None = None  # None: as train would choose
    overrides: dict = field(default_factory=dict)  # other Ultralytics training arguments (mosaic=0 ...)


def preview(req: PreviewRequest) -> dict:
    """Write the grid image of one augmented batch; return what was drawn (path, size, images, boxes, pipeline)."""
    from detector.config import BUILTIN_DEFAULTS, BUILTIN_OVERRIDES  # the built-in dataset's demo settings
    from detector.yolo import checks, loader

    if req.batch < 1:
        raise UsageError(f"--batch must be at least 1, not {req.batch}")
    paths.check_writes([Path(req.out).expanduser().absolute().parent], what="--out")
    overrides, imgsz = dict(req.overrides), req.imgsz
    if req.data is None:
        overrides = {**BUILTIN_OVERRIDES, **overrides}
        imgsz = imgsz or BUILTIN_DEFAULTS["imgsz"]
        data = datasets.load(synth.ensure(synth.SynthSpec(seed=0), runtime.datasets_cache()))
    else:
        data = datasets.load(req.data)
    imgsz = imgsz or 640
    if imgsz < 32:
        raise UsageError(f"--imgsz must be at least 32, not {imgsz}")
    out = _writable_image_path(req.out)
    checks.check_overrides(overrides)
    pipeline = augment.resolve(req.augment, imgsz)
    with tempfile.TemporaryDirectory(prefix="detector-preview-") as tmp:
        data_yaml = data.write_resolved(Path(tmp) / "data.yaml")
        batch = loader.augmented_batch(data_yaml, list(pipeline.transforms), imgsz, req.batch, seed=req.seed,
                                     overrides=overrides)
    grid = draw_grid(batch)
    try:
        fileio.encode_image(out, grid)
    except OSError as e:
        if fileio.is_disk_full(e):
            raise
        raise UsageError(f"could not write {out} ({e.strerror or e}); pass --out with a .jpg or .png path in a "
                         "writable folder") from None
    return {"out": str(out), "width": grid.shape[1], "height": grid.shape[0], "images": len(batch["images"]),
            "boxes": len(batch["cls"]), "pipeline": pipeline.describe()}


def _writable_image_path(out: Path) -> Path:
    out = Path(out).expanduser()
    if out.suffix.lower() not in {".jpg", ".jpeg", ".png", ".bmp", ".webp"}:
        raise UsageError(f"--out {out}: use a .jpg or .png file name")
    out.parent.mkdir(parents=True, exist_ok=True)
    return out


def grid_shape(n: int) -> tuple[int, int]:
    """(rows, cols) of the grid for n images: as square as possible, rows filled first."""
    cols = max(1, math.ceil(math.sqrt(n)))
    return math.ceil(n / cols), cols


def draw_grid(batch: dict) -> np.ndarray:
    """A BGR image: every batch image in a grid tile, its boxes drawn with class names."""
    import cv2

    images = batch["images"]
    n, h, w = images.shape[:3]
    rows, cols = grid_shape(n)
    grid = np.full((rows * h, cols * w, 3), 114, dtype=np.uint8)  # Ultralytics' letterbox grey for empty tiles
    scale = max(0.3, h / 640)  # text size that stays legible from 64 to 1280 px
    thick = max(1, round(h / 320))
    for i in range(n):
        tile = np.ascontiguousarray(images[i][..., ::-1])  # RGB -> BGR for OpenCV
        mine = batch["batch_idx"] == i
        for cls, (cx, cy, bw, bh) in zip(batch["cls"][mine], batch["bboxes"][mine]):
            x1, y1, x2, y2 = (int(round(v)) for v in ((cx - bw / 2) * w, (cy - bh / 2) * h,
                                                        (cx + bw / 2) * w, (cy + bh / 2) * h))
            colour = _PALETTE[int(cls) % len(_PALETTE)]
            cv2.rectangle(tile, (x1, y1), (x2, y2), colour, thick)
            _label(tile, batch["names"].get(int(cls), str(int(cls))), (x1, y1), colour, scale)
        cv2.rectangle(tile, (0, 0), (w - 1, h - 1), (255, 255, 255), 1)  # tile border
        r, c = divmod(i, cols)
        grid[r * h:(r + 1) * h, c * w:(c + 1) * w] = tile
    return grid


def _label(tile: np.ndarray, text: str, corner: tuple[int, int], colour, scale: float) -> None:
    """Class name on a filled background above (or inside, at the top edge) the box's top-left corner."""
    import cv2

    (tw, th), base = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, scale, 1)
    x, y = max(corner[0], 0), corner[1]
    top = y - th - base if y - th - base >= 0 else max(y, 0)
    cv2.rectangle(tile, (x, top), (x + tw, top + th + base), colour, -1)
    cv2.putText(tile, text, (x, top + th), cv2.FONT_HERSHEY_SIMPLEX, scale, (255, 255, 255), 1, cv2.LINE_AA)
