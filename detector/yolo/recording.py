"""The recording trainer: Ultralytics' DetectionTrainer with the run record attached, and train/resume.

A device out-of-memory error that escapes Ultralytics leaves as DeviceOutOfMemory
with where it happened, the device memory freed, so the use case can step down.
"""

from __future__ import annotations

import functools
import gc
from pathlib import Path

import torch
from ultralytics import YOLO
from ultralytics.cfg import DEFAULT_CFG
from ultralytics.models.yolo.detect import DetectionTrainer
from ultralytics.utils import LOCAL_RANK, RANK
from ultralytics.utils.torch_utils import torch_distributed_zero_first, unwrap_model

from detector import facts
from detector.errors import DeviceOutOfMemory
from detector.record.writer import Recorder
from detector.yolo import callbacks, checkpoints, fastload
from detector.yolo.loader import single_thread_collate


class RecordingTrainer(DetectionTrainer):
    """Ultralytics' detection trainer with the run record attached (rank 0 only).

    Callbacks are attached here rather than by the caller so they also exist in
    the processes Ultralytics spawns for DDP, which rebuild the trainer from its
    class alone: there the recorder is opened on the save folder.
    """

    def __init__(self, cfg=DEFAULT_CFG, overrides=None, _callbacks=None, recorder: Recorder | None = None,
                 loader: str | None = None):
        super().__init__(cfg, overrides, _callbacks)
        recorder = recorder or Recorder(self.save_dir)
        # which training pipeline build_dataset uses (fastload: "fast" or "ultralytics"); DDP's processes,
        # built from the class alone, read the run's choice from run.json
        self.loader = loader or recorder.read().get("loader") or fastload.DEFAULT
        self.progress = None
        if RANK in {-1, 0}:
            self.recorder = recorder
            self.progress = callbacks.attach(self, self.recorder)

    def build_dataset(self, img_path, mode="train", batch=None):
        if mode != "train" or self.loader == "ultralytics":  # validation always keeps Ultralytics' letterbox
            return single_thread_collate(super().build_dataset(img_path, mode, batch))  # see single_thread_collate
        gs = max(int(unwrap_model(self.model).stride.max()), 32)  # as DetectionTrainer.build_dataset
        dataset = fastload.build_dataset(self.args, img_path, batch, self.data, mode=mode, stride=gs,
                                         loader=self.loader)
        if self.progress:  # what really runs: a configuration the fast pipeline lacks trains with the stock one
            self.recorder.update(loader="fast" if getattr(dataset, "fast", False) else "ultralytics")
        return single_thread_collate(dataset)

    def preprocess_batch(self, batch):
        batch = super().preprocess_batch(batch)
        if self.progress:
            self.progress.batch_size = int(batch["img"].shape[0])
        return batch

    def optimizer_step(self):
        if getattr(self, "grad_meter", None):  # before Ultralytics unscales and clips the gradients
            self.grad_meter.before_step(self)
        super().optimizer_step()
        if self.progress:
            self.progress.opt_steps += 1

    def validate(self):
        if self.progress:
            self.progress.validated = True
        return super().validate()

    def save_model(self):
        # The epoch's row first, then the checkpoint (temp file, fsync, rename), then run.json's progress
        # (on_model_save): after a kill at any instant epochs.csv is at most one epoch ahead of last.pt,
        # and resume trims it to last.pt's epoch and trains that epoch again.
        self.run_callbacks(callbacks.BEFORE_CHECKPOINT)
        last, best = self.last, self.best
        self.last, self.best = checkpoints.AtomicTarget(last), checkpoints.AtomicTarget(best)
        try:
            return super().save_model()
        finally:
            self.last, self.best = last, best

    def final_eval(self):
        # Ultralytics' final_eval, with last.pt and best.pt stripped atomically instead of rewritten in place.
        if self.progress:
            self.progress.in_final = True
        try:
            with torch_distributed_zero_first(LOCAL_RANK):
                if RANK in {-1, 0}:
                    ckpt = checkpoints.strip_atomic(self.last) if self.last.exists() else {}
                    if self.best.exists():
                        checkpoints.strip_atomic(self.best, updates={"train_results": ckpt.get("train_results")})
            if self.best.exists():
                self.validator.args.plots = self.args.plots
                self.validator.args.compile = False
                self.metrics = self.validator(model=self.best)
                self.metrics.pop("fitness", None)
                self.epoch += 1  # as Ultralytics: the final metrics are logged one step after the last epoch
                self.run_callbacks("on_fit_epoch_end")
                self.epoch -= 1
        finally:
            if self.progress:
                self.progress.in_final = False


def train(overrides: dict, recorder: Recorder, trainer_cls: type = RecordingTrainer) -> dict:
    """Train with the record attached; return what the trainer ended with.

    A device out-of-memory error that escapes Ultralytics is raised as DeviceOutOfMemory
    (see _fit_once), so the caller can step the batch down and resume. trainer_cls is the
    seam where tests put a RecordingTrainer subclass that fails like a full GPU.
    """
    return _fit_once(overrides["model"], recorder, trainer_cls, **overrides)


def resume(last_pt: Path, overrides: dict, recorder: Recorder) -> dict:
    """Continue a run from its last.pt, appending to the same record."""
    return _fit_once(str(last_pt), recorder, RecordingTrainer, resume=str(last_pt), **overrides)


def _outcome(trainer) -> dict:
    return {"batch_used": trainer.batch_size, "epochs": trainer.epochs, "best": str(trainer.best)}


def is_out_of_memory(error: BaseException) -> bool:
    """True for PyTorch's device out-of-memory errors (torch.OutOfMemoryError or its RuntimeError text)."""
    return isinstance(error, torch.OutOfMemoryError) or (
        isinstance(error, RuntimeError) and facts.is_memory_error_text(str(error)))


def release_device_memory() -> None:
    """Collect garbage and hand cached CUDA blocks back, after an out-of-memory error or a probe."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _fit_once(spec: str, recorder: Recorder, trainer_cls: type, **train_args) -> dict:
    """YOLO(spec).train(**train_args); an out-of-memory error leaves as DeviceOutOfMemory, memory freed first."""
    # `loader` is detector's key, not Ultralytics': taken out here; a resume or step-down keeps the recorded one
    loader = fastload.check_loader(train_args.pop("loader", None) or recorder.read().get("loader")
                                   or fastload.DEFAULT)
    model = YOLO(spec)
    # Model.train builds the trainer as trainer(overrides=..., _callbacks=...): the partial adds recorder and loader.
    factory = functools.partial(trainer_cls, recorder=recorder, loader=loader)
    try:
        model.train(trainer=factory, **train_args)
        return _outcome(model.trainer)
    except RuntimeError as e:
        if not is_out_of_memory(e):
            raise
        where = _oom_position(model.trainer)
        detail = (str(e).strip().splitlines() or ["out of memory"])[0][:160]
    # Out here the traceback and its frames, which hold the trainer's tensors, are gone; drop the
    # trainer too, so the next attempt starts on an empty device.
    model = None
    release_device_memory()
    at = f"epoch {where['epoch']}, {where['phase']}" if where["epoch"] else where["phase"]
    raise DeviceOutOfMemory(f"out of memory at batch {where['batch']} ({at}): {detail}", **where)


def _oom_position(trainer) -> dict:
    """Where training stood when it ran out of memory: batch, 1-based epoch and global iteration, phase."""
    p = getattr(trainer, "progress", None)
    batch = int(getattr(trainer, "batch_size", 0) or 0)
    if p is None or p.epoch is None:
        return {"batch": batch, "epoch": None, "iteration": None, "epoch_iteration": None, "phase": "setup"}
    trainer.recorder.close()
    phase = "final validation" if p.in_final else "validation" if p.validated else "training"
    step = 1 if phase == "training" else 0  # in training, the iteration that failed is the next one
    return {"batch": batch, "epoch": p.epoch, "iteration": p.iteration + step,
            "epoch_iteration": p.epoch_rows + step if step else None, "phase": phase}
