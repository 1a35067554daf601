"""The final validation of best.pt, on its own: what a resume does when every epoch already ended.

A run interrupted while Ultralytics validated best.pt after its last epoch has
all its epochs and weights; Ultralytics' own resume refuses it ("nothing to
resume"). This finishes it the way the trainer's final_eval would have.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from detector import facts
from detector.record.writer import Recorder
from detector.yolo import checkpoints


def final_validation(run_dir: Path, recorder: Recorder, device: str | None = None) -> dict:
    """Strip last.pt and best.pt (atomically) and validate best.pt; record it as run.json's `final`."""
    from ultralytics import YOLO

    wdir = run_dir / "weights"
    last, best = wdir / "last.pt", wdir / "best.pt"
    ckpt = checkpoints.strip_atomic(last) if last.is_file() else {}
    if not best.is_file():  # Ultralytics skips the final validation without best.pt too
        return {}
    checkpoints.strip_atomic(best, updates={"train_results": ckpt.get("train_results")})
    args = ckpt.get("train_args") or {}
    val_args = {"data": str(run_dir / "data.yaml"), "imgsz": args.get("imgsz", 640), "plots": False,
                "batch": facts.val_batch(int(args.get("batch") or 16)), "workers": args.get("workers", 0),
                "verbose": False}
    if device is not None or args.get("device") is not None:
        val_args["device"] = device if device is not None else args.get("device")
    # The validator makes a save folder; a temporary one keeps the run folder as training left it.
    with tempfile.TemporaryDirectory(prefix="detector-final-") as tmp:
        metrics = YOLO(str(best)).val(project=tmp, name="val", **val_args).results_dict
    final = {"weights": str(best), **{ours: metrics.get(theirs) for ours, theirs in facts.METRIC_KEYS.items()}}
    recorder.update(final=final)
    return {"epochs": args.get("epochs"), "best": str(best)}
