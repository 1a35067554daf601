"""Score trained weights on a dataset's val split: Ultralytics' mAP and, with a COCO file, COCO's (detector val).

Ultralytics' figure is the one epochs.csv records (its validator, conf 0.001,
IoU 0.7). With --coco-gt the same weights predict every val image the COCO
annotation file lists (same conf and IoU, through the predict path), the boxes
get the file's ids (detector.deploy.coco) and pycocotools scores them.
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path

from detector.data import sources
from detector.deploy import coco
from detector.deploy.predict import detections, resolve_weights
from detector.errors import DatasetError, UsageError

log = logging.getLogger(__name__)

WHY_THEY_DIFFER = (
    "They differ by design: Ultralytics integrates an interpolated precision-recall curve (trapezoids over 101 "
    "recall points) and keeps up to 300 boxes per image, while COCO averages precision at 101 recall points, "
    "counts at most 100 boxes per image and ignores crowd boxes; COCO also splits by object area (APs/APm/APl).")
ULTRALYTICS_NAMES = (("map50_95", "mAP50-95"), ("map50", "mAP50"), ("precision", "precision"), ("recall", "recall"))


@dataclass(frozen=True)
class ValConfig:
    """Every option of one val command, resolved by the CLI."""

    source: Path  # a run folder (its weights/best.pt) or a .pt
    data: Path | None = None  # None: the run folder's data.yaml
    coco_gt: Path | None = None
    imgsz: int | None = None  # None: the training size the .pt remembers
    batch: int = 16
    device: str = "cpu"
    conf: float = 0.001  # Ultralytics' validation defaults, used for the COCO predictions too
    iou: float = 0.7


def _data_yaml(config: ValConfig, weights: Path) -> Path:
    if config.data is not None:
        return Path(config.data).expanduser()
    beside = weights.parent.parent / "data.yaml"  # a run folder's resolved copy
    if beside.is_file():
        return beside
    raise UsageError(f"no dataset for {weights}: pass --data with the YOLO data YAML to validate on")


def run(config: ValConfig) -> dict:
    """Validate and return {'weights', 'data', 'images', 'ultralytics': {...}, 'coco': {...} or None}."""
    from detector.data import datasets

    weights = resolve_weights(config.source)
    if weights.suffix != ".pt":
        raise UsageError(f"{weights} is not a .pt file; detector val scores PyTorch weights (a run's best.pt)")
    data = datasets.load(_data_yaml(config, weights))
    val_files = [Path(f) for f in sorted(data.splits["val"])]
    if not val_files:
        raise DatasetError(f"{data.yaml} has no val images")
    matched = _coco_images(config.coco_gt, val_files) if config.coco_gt else None
    from detector.yolo import inference, validate

    model = inference.load_model(weights)
    remap = matched.with_classes(model.names) if matched else None  # class names checked before the long part
    imgsz = config.imgsz or int(inference.model_defaults(model)["imgsz"] or 640)
    log.info(f"Validating {weights} on {len(val_files)} val image(s) of {data.yaml} at imgsz {imgsz}...")
    with tempfile.TemporaryDirectory(prefix="detector-val-") as tmp:
        resolved = data.write_resolved(Path(tmp) / "data.yaml")
        ultralytics = validate.validate(weights, resolved, imgsz, config.batch, config.device)
    result = {"weights": str(weights), "data": str(data.yaml), "images": len(val_files), "imgsz": imgsz,
              "ultralytics": ultralytics, "coco": None}
    if remap:
        files = [f for f in val_files if f.name in remap.image_ids]
        log.info(f"COCO: predicting {len(files)} image(s) listed in {config.coco_gt}...")
        rows = _predict(model, files, config, imgsz)
        scored = remap.apply(rows)
        result["coco"] = {"annotations": str(config.coco_gt), "images": len(files), "detections": len(scored),
                          **coco.evaluate(Path(config.coco_gt), scored, sorted(set(remap.image_ids.values())))}
    return result


def _coco_images(gt_path: Path, val_files: list[Path]) -> coco.Remap:
    """The val images the annotation file lists (by file name); DatasetError when it lists none."""
    coco.require()
    ids = coco.load(gt_path)
    image_ids = {f.name: ids.image_id(f.name) for f in val_files}
    image_ids = {name: i for name, i in image_ids.items() if i is not None}
    if not image_ids:
        raise DatasetError(f"none of the {len(val_files)} val images is listed in {gt_path} "
                           "(images are matched by file name)")
    return coco.Remap(ids, image_ids)


def _predict(model, files: list[Path], config: ValConfig, imgsz: int) -> list[dict]:
    from detector.yolo import inference

    rows: list[dict] = []
    for start in range(0, len(files), config.batch):
        chunk = files[start:start + config.batch]
        results = inference.predict(model, [sources.read(f) for f in chunk], config.conf, config.iou, imgsz,
                                    config.device)
        for f, result in zip(chunk, results):
            rows += detections(result, 0, f.name)  # image_id comes from the annotation file
    return rows


def format_report(result: dict) -> list[str]:
    """The lines `detector val` prints: both mAPs side by side, then COCO's 12 metrics."""
    ul, cc = result["ultralytics"], result["coco"]
    lines = [f"Ultralytics ({result['images']} val images): "
             + "  ".join(f"{label} {ul[key]:.4f}" for key, label in ULTRALYTICS_NAMES)]
    if cc is None:
        return lines
    lines.append(f"COCO (pycocotools, {cc['images']} images of {cc['annotations']}, {cc['detections']} boxes):")
    # COCOeval's -1: nothing to measure in that area range (no small objects, say).
    lines += [f"  {name:<6} {cc[name]:7.4f}   {text}" if cc[name] >= 0 else f"  {name:<6}     n/a   {text} (no objects)"
              for name, text in coco.METRICS]
    lines.append(f"mAP50-95: Ultralytics {ul['map50_95']:.4f}, COCO {cc['AP']:.4f};  "
                 f"mAP50: Ultralytics {ul['map50']:.4f}, COCO {cc['AP50']:.4f}")
    lines.append(WHY_THEY_DIFFER)
    return lines
