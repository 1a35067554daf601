"""Benchmark-only helpers: Ultralytics' own trainer, loader and AutoBatch as baselines, and fresh weights.

Nothing in detector/ imports this; it lives beside the benchmarks that need it.
"""

from __future__ import annotations

import time
from pathlib import Path

from detector import runtime

runtime.prepare()  # before ultralytics is imported


def plain_trainer():
    """Ultralytics' DetectionTrainer, without the record or detector's collate."""
    from ultralytics.models.yolo.detect import DetectionTrainer

    return DetectionTrainer


def unrecorded_trainer():
    """detector's trainer (its single-threaded collate) with no callbacks attached."""
    from ultralytics.models.yolo.detect import DetectionTrainer

    from detector.yolo.recording import RecordingTrainer

    from detector.yolo import fastload

    class UnrecordedTrainer(RecordingTrainer):
        def __init__(self, *a, **k):
            self.loader = fastload.DEFAULT  # the same training pipeline as the recorded trainer
            DetectionTrainer.__init__(self, *a, **k)
            self.progress = None

    return UnrecordedTrainer


def fit(trainer_cls, args: dict) -> None:
    """YOLO(model).train(trainer=trainer_cls, **args), as Ultralytics runs any trainer."""
    from ultralytics import YOLO

    YOLO(args["model"]).train(trainer=trainer_cls, **args)


def time_recording_callbacks(spent: list[float]) -> None:
    """Make every recording callback add its run time to spent[0] (patches detector.yolo.callbacks.attach)."""
    from detector.yolo import callbacks

    original = callbacks.attach

    def timed(fn):
        def wrapper(*a, **k):
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                spent[0] += time.perf_counter() - t
        return wrapper

    def attach(trainer, rec):
        before = {e: list(fns) for e, fns in trainer.callbacks.items()}
        progress = original(trainer, rec)
        for event, fns in trainer.callbacks.items():
            trainer.callbacks[event] = [f if f in before.get(event, []) else timed(f) for f in fns]
        return progress

    callbacks.attach = attach


def save_fresh_model(model_yaml: str, path: Path) -> Path:
    """Save an untrained model built from a YAML as a .pt, for benchmarks that need no trained weights."""
    from ultralytics import YOLO

    from detector.yolo.checks import check_model

    model = YOLO(check_model(model_yaml))
    path.parent.mkdir(parents=True, exist_ok=True)
    model.save(str(path))
    return path


def stock_training_loader(data_yaml: Path, imgsz: int, batch: int, workers: int = 0, seed: int = 0,
                          overrides: dict | None = None):
    """Ultralytics' training loader exactly as it ships: its own Albumentations set and its own collate."""
    from ultralytics.data import build_dataloader

    from detector.yolo.loader import training_loader

    dataset, _, names = training_loader(data_yaml, None, imgsz, batch, workers=workers, seed=seed,
                                        overrides=overrides, loader="ultralytics")
    dataset.collate_fn = type(dataset).collate_fn  # undo detector's single-threaded collate
    return dataset, build_dataloader(dataset, batch=batch, workers=workers, shuffle=True, rank=-1), names


def ultralytics_autobatch(model_spec: str, nc: int, imgsz: int, device_index: int = 0, max_num_obj: int = 0,
                          dataset_size: int = 0) -> int:
    """Ultralytics' own AutoBatch (batch=-1) on the same model, for tools/bench_batch.py to compare against."""
    import torch
    from ultralytics.nn.tasks import DetectionModel, load_checkpoint
    from ultralytics.utils.autobatch import check_train_batch_size

    from detector.yolo.hermetic import offline_check_amp
    from detector.yolo.recording import release_device_memory

    if not torch.cuda.is_available():
        raise SystemExit("Ultralytics' AutoBatch needs a CUDA device")
    cfg = load_checkpoint(model_spec)[0].yaml if str(model_spec).endswith(".pt") else model_spec
    model = DetectionModel(cfg, nc=nc, verbose=False).to(torch.device("cuda", device_index))
    try:
        return check_train_batch_size(model, imgsz, amp=offline_check_amp(model), max_num_obj=max_num_obj,
                                      dataset_size=dataset_size)
    finally:
        model = None
        release_device_memory()
