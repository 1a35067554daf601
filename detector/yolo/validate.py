"""Ultralytics' own validation of a .pt on a dataset: the mAP epochs.csv records (detector val)."""

from __future__ import annotations

import tempfile
from pathlib import Path

from detector.errors import ModelError
from detector.yolo.inference import _first_line, _quiet_ultralytics, load_model


def validate(weights: Path, data_yaml: Path, imgsz: int, batch: int = 16, device: str = "cpu") -> dict:
    """Precision, recall, mAP50 and mAP50-95 as Ultralytics' validator computes them (conf 0.001, IoU 0.7).

    data_yaml must be resolved (absolute paths, no `download:`), as train writes it,
    so the validator finds the images without looking anywhere else.
    """
    model = load_model(weights)
    with tempfile.TemporaryDirectory(prefix="detector-val-") as tmp, _quiet_ultralytics():
        try:
            metrics = model.val(data=str(data_yaml), imgsz=imgsz, batch=batch, device=device, plots=False,
                                verbose=False, save_json=False, project=tmp, name="val", exist_ok=True)
        except Exception as e:  # a dataset Ultralytics cannot read, a class count that does not match
            raise ModelError(f"Ultralytics' validation of {weights} failed: {_first_line(e)}") from None
    box = metrics.box
    return {"precision": float(box.mp), "recall": float(box.mr), "map50": float(box.map50),
            "map50_95": float(box.map)}
