"""Run a .pt or exported detector on images and write what it found (detector predict).

Outputs, in the --out folder: predictions.json (COCO results style, one object per
box, with the image's file name and the class name), predictions.csv (the same
rows), and images/ with each image annotated. Every image is checked readable
before any output is written.
"""

from __future__ import annotations

import logging
import csv
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from detector import fileio
from detector.data import sources
from detector.deploy import coco
from detector.errors import ModelError, UsageError

log = logging.getLogger(__name__)

CSV_COLUMNS = ("image_id", "file_name", "category_id", "category_name", "score", "x", "y", "w", "h")


@dataclass(frozen=True)
class PredictConfig:
    """Every option of one predict command, resolved by the CLI."""

    weights: Path  # .pt, an exported model (.onnx, .torchscript, *_openvino_model/ ...) or a run folder
    source: str  # an image, a folder or a glob
    out: Path | None = None  # None: predictions/<date>-<time>
    conf: float = 0.25
    iou: float = 0.7
    imgsz: int | None = None  # None: the model's own (training size for .pt, export size otherwise)
    device: str = "cpu"
    batch: int = 16  # images handed to Ultralytics at once (memory bound, not a model batch)
    save_images: bool = True
    coco_gt: Path | None = None  # a COCO instances JSON: image and category ids come from it


def resolve_weights(weights: Path) -> Path:
    """A weights file or exported model folder; a run folder means its weights/best.pt."""
    weights = Path(weights).expanduser()
    if weights.is_dir() and ((weights / "weights").is_dir() or (weights / "run.json").is_file()):
        best = weights / "weights" / "best.pt"
        if not best.is_file():
            raise ModelError(f"run folder {weights} has no weights/best.pt (did training finish an epoch?)")
        return best
    if not weights.exists():
        raise ModelError(f"weights {weights} not found; pass a .pt, an exported model or a run folder")
    return weights


def detections(result: dict, image_id: int, file_name: str) -> list[dict]:
    """COCO-results rows for one image: bbox is [x, y, w, h] in pixels of the original image."""
    rows = []
    for (x1, y1, x2, y2), score, cls in zip(result["xyxy"].tolist(), result["score"].tolist(), result["cls"].tolist()):
        rows.append({"image_id": image_id, "file_name": file_name, "category_id": int(cls),
                     "category_name": result["names"].get(int(cls), str(cls)), "score": round(float(score), 6),
                     "bbox": [round(x1, 3), round(y1, 3), round(x2 - x1, 3), round(y2 - y1, 3)]})
    return rows


def run(config: PredictConfig) -> Path:
    """Predict on every image of SOURCE and write the outputs; return the output folder."""
    if not 0 < config.conf < 1:
        raise UsageError(f"--conf {config.conf} must lie between 0 and 1")
    weights = resolve_weights(config.weights)  # the cheap check first: a wrong path reads no image
    files = sources.resolve(config.source)
    names = sources.relative_names(files)
    for f in files:  # fail on a damaged image before writing anything
        sources.read(f)
    remap = coco.Remap.for_images(config.coco_gt, names) if config.coco_gt else None  # every image listed there
    from detector.yolo import checks, inference

    checks.device_info(config.device)  # a GPU asked for but absent: UsageError naming --device cpu
    model = inference.load_model(weights)
    if remap:
        remap.with_classes(model.names)
    out = Path(config.out or Path("predictions") / datetime.now().strftime("%Y%m%d-%H%M%S")).expanduser()
    _check_out(out, config, files, names, weights)
    log.info(f"Predicting {len(files)} image(s) with {weights} on {config.device}...")
    rows = []
    with fileio.filling(out) as stage:  # moved into out once complete; a failure leaves nothing of this command
        for start in range(0, len(files), config.batch):
            chunk = files[start:start + config.batch]
            results = inference.predict(model, [sources.read(f) for f in chunk], config.conf, config.iou,
                                        config.imgsz, config.device)
            for i, result in enumerate(results, start):
                rows += detections(result, i, names[i])
                if config.save_images:
                    _save_image(stage / "images" / names[i], result["plot"])
        rows = remap.apply(rows) if remap else rows
        _write(stage, rows)
    log.info(f"{len(rows)} box(es) on {len(files)} image(s) above conf {config.conf}: "
             f"{out}/predictions.json, predictions.csv" + (", images/" if config.save_images else ""))
    return out


def _check_out(out: Path, config: PredictConfig, files: list[Path], names: list[str], weights: Path) -> None:
    """Refuse an --out that would write into the source folder, a dataset or another run, or over a source image."""
    from detector import paths

    source = Path(str(config.source)).expanduser()
    written = [out, out / "images"] if config.save_images else [out]
    paths.check_writes(written, [source] if source.is_dir() else [], allow_run=paths.enclosing_run(weights))
    if config.save_images:
        inputs = {f.resolve() for f in files}
        hit = next((n for n in names if (out / "images" / n).resolve() in inputs), None)
        if hit is not None:
            raise UsageError(f"--out {paths.shown(out)} would overwrite the source image {paths.shown(out / 'images' / hit)}; "
                             "choose another --out")


def _save_image(path: Path, image) -> None:
    # Encoded in memory (no libpng lines on a full disk); a suffix OpenCV cannot write is kept as PNG.
    path.parent.mkdir(parents=True, exist_ok=True)
    fileio.encode_image(path, image)


def _write(out: Path, rows: list[dict]) -> None:
    fileio.write_json(out / "predictions.json", rows, indent=1)
    with fileio.atomic(out / "predictions.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(CSV_COLUMNS)
        for r in rows:
            writer.writerow([r["image_id"], r["file_name"], r["category_id"], r["category_name"], r["score"],
                             *r["bbox"]])
