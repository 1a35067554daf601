"""What the recording trainer's callbacks copy from Ultralytics into the run record.

Three listeners, one per concern, share a `Progress` of plain counters: `RunState`
(run.json: what the trainer really uses, resumes, restarted epochs), `IterationRows`
(iterations.csv) and `EpochRows` (epochs.csv and run.json's progress). They copy
the few trainer fields the record needs into plain rows and hand them to
detector.record; they cope with what the 8.4 trainer really does: an epoch
restarted after an out-of-memory batch halving or a NaN recovery, the extra
`on_fit_epoch_end` of the final validation on best.pt, and callbacks running on
every DDP rank (the trainer attaches them on rank 0 only).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from detector import facts
from detector.record.writer import Recorder
from detector.yolo import gradstats

# Our own event, fired by RecordingTrainer.save_model just before it writes the epoch's checkpoint.
BEFORE_CHECKPOINT = "before_checkpoint"


@dataclass
class Progress:
    """Counters of the training in progress, shared by the listeners (rank 0 only)."""

    iteration: int = 0  # global, continued across resumes
    images_seen: int = 0
    opt_steps: int = 0
    time_offset: float = 0.0  # time_s of the last kept row when resuming
    epoch: int | None = None  # 1-based epoch of the attempt in progress
    epoch_batch: int = 0  # the batch the current epoch started with
    batch_size: int = 0  # images in the batch being trained (set by preprocess_batch)
    epoch_rows: int = 0
    epoch_images: int = 0
    epoch_train_time: float = 0.0
    data_wait_s: float = 0.0  # since this process started training: time waiting for the next batch ...
    train_s: float = 0.0  # ... and the whole iterations' time (run.json's data_wait)
    validated: bool = False
    in_final: bool = False  # the final validation of best.pt after the last epoch
    best: dict | None = None
    train_start: float = 0.0
    resume_base: dict | None = None  # the last iteration row kept when training (re)started
    # Columns other listeners (gradstats) add to the row being written; set before the row listeners run.
    iteration_extra: dict = field(default_factory=dict)
    epoch_extra: dict = field(default_factory=dict)

    def restore(self, row: dict | None, keep_steps: bool = False) -> None:
        """Continue counters from the last kept iteration row (or from zero)."""
        self.iteration = int(row["iteration"]) if row else 0
        self.images_seen = int(row["images_seen"]) if row else 0
        if not keep_steps:
            self.opt_steps = int(row["optimizer_step"]) if row else 0


def gpu_gb(trainer, peak: bool = False) -> float | None:
    """Reserved (or peak reserved) GiB on the trainer's CUDA device; None on CPU."""
    if trainer.device.type != "cuda":
        return None
    fn = torch.cuda.max_memory_reserved if peak else torch.cuda.memory_reserved
    return fn(trainer.device) / 2**30


class RunState:
    """run.json: the settings the trainer really uses, resumes, and epochs Ultralytics restarts."""

    def __init__(self, rec: Recorder, p: Progress):
        self.rec, self.p = rec, p

    def on_pretrain_routine_end(self, trainer) -> None:
        p = self.p
        p.train_start = time.time()
        last = self.rec.keep_epochs_through(trainer.start_epoch)  # resume: drop the unfinished epoch's rows
        p.restore(last)
        p.resume_base = last
        if last:  # time_s and the best epoch continue across a resume
            p.time_offset = float(last["time_s"])
            p.best = (self.rec.read().get("progress") or {}).get("best")
        if trainer.start_epoch:
            self.rec.event("resumed", from_epoch=trainer.start_epoch + 1, iteration=p.iteration)
        self.rec.batch_used(trainer.batch_size)
        groups = trainer.optimizer.param_groups
        self.rec.update(nbs=trainer.args.nbs, accumulate=trainer.accumulate, optimizer=type(trainer.optimizer).__name__,
                        lr0=max(g.get("initial_lr", g["lr"]) for g in groups),
                        iterations_per_epoch=len(trainer.train_loader), amp=bool(trainer.amp), status="running")

    def on_train_epoch_start(self, trainer) -> None:
        p, epoch = self.p, trainer.epoch + 1
        if p.epoch == epoch:  # Ultralytics restarted this epoch: drop the aborted attempt's rows
            self._restarted(trainer, epoch)
        p.epoch, p.epoch_batch = epoch, trainer.batch_size
        p.epoch_rows = p.epoch_images = 0
        p.epoch_train_time = 0.0
        p.validated = False
        if trainer.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(trainer.device)

    def _restarted(self, trainer, epoch: int) -> None:
        p = self.p
        last = self.rec.keep_epochs_through(epoch - 1) or p.resume_base
        discarded = p.iteration - (int(last["iteration"]) if last else 0)
        if trainer.batch_size != p.epoch_batch:
            # Weights did receive the aborted attempt's updates, so optimizer_step keeps counting them.
            p.restore(last, keep_steps=True)
            failed_at = p.epoch_rows + 1  # the iteration that ran out of memory, within the epoch
            self.rec.oom_step_down(epoch=epoch, iteration=p.iteration + failed_at, epoch_iteration=failed_at,
                                   phase="training", from_batch=p.epoch_batch, to_batch=trainer.batch_size,
                                   action="batch halved by Ultralytics, epoch restarted",
                                   discarded_iterations=discarded)
            self.rec.batch_used(trainer.batch_size)
            self.rec.update(accumulate=trainer.accumulate, iterations_per_epoch=len(trainer.train_loader))
        else:  # NaN recovery reloaded last.pt: the aborted updates are undone
            p.restore(last)
            self.rec.event("epoch_restarted", epoch=epoch, reason="NaN/Inf loss, weights reloaded from last.pt",
                           discarded_iterations=discarded)


class IterationRows:
    """iterations.csv: one row per training iteration, written as it ends."""

    def __init__(self, rec: Recorder, p: Progress):
        self.rec, self.p = rec, p
        self._last_end = self._batch_start = 0.0

    def on_train_epoch_start(self, trainer) -> None:
        self._last_end = time.time()

    def on_train_batch_start(self, trainer) -> None:
        self._batch_start = time.time()

    def on_train_batch_end(self, trainer) -> None:
        p, now = self.p, time.time()
        names = list(trainer.loss_items)
        values = torch.stack([trainer.loss_items[k].float() for k in names]).tolist()  # one device sync
        images = p.batch_size * max(trainer.world_size, 1)
        p.iteration += 1
        p.epoch_rows += 1
        p.images_seen += images
        p.epoch_images += images
        iter_time = now - self._last_end
        p.epoch_train_time += iter_time
        # The wait for the next batch: from the end of the last iteration (its loss already synced from the
        # device, so the GPU is idle) to the loop's next batch start; the copy to the device is the step's.
        wait = self._batch_start - self._last_end
        p.data_wait_s += wait
        p.train_s += iter_time
        row = dict(zip(names, values))
        row.update(
            epoch=p.epoch, iteration=p.iteration, epoch_iteration=p.epoch_rows, batch_size=images,
            images_seen=p.images_seen, optimizer_step=p.opt_steps, loss=float(sum(values)),
            lr=float(trainer.optimizer.param_groups[0]["lr"]),
            time_s="%.3f" % (now - p.train_start + p.time_offset),
            iter_time_s="%.4f" % iter_time, data_time_s="%.4f" % wait,
            gpu_mem_gb=gpu_gb(trainer),
            **p.iteration_extra,
        )
        self.rec.iteration(names, row)
        self._last_end = time.time()  # recording time is not counted as the next batch's data time


class EpochRows:
    """epochs.csv: one row per completed epoch; run.json's progress and the final validation.

    When the epoch is checkpointed, its row is written just before the checkpoint
    and run.json's progress just after (RecordingTrainer.save_model), so that a
    kill between them leaves epochs.csv ahead of last.pt, which a resume trims,
    never behind it, which no resume could repair.
    """

    def __init__(self, rec: Recorder, p: Progress):
        self.rec, self.p = rec, p
        # (iteration, epoch) whose row / progress is written: the epoch's row goes out once, before its checkpoint
        self._row_written = self._progress_written = None

    def before_checkpoint(self, trainer) -> None:
        self._write_row(trainer, epoch_time=time.time() - trainer.epoch_time_start)

    def on_model_save(self, trainer) -> None:
        self._write_progress(trainer)

    def on_fit_epoch_end(self, trainer) -> None:
        if self.p.in_final:  # the extra call after validating best.pt: not an epoch
            m = trainer.metrics or {}
            metrics = {ours: m.get(theirs) for ours, theirs in facts.METRIC_KEYS.items()}
            self.rec.update(final={"weights": str(trainer.best), **metrics})
            return
        self._write_row(trainer, epoch_time=trainer.epoch_time)  # when the epoch was not checkpointed
        self._write_progress(trainer)

    def _write_row(self, trainer, epoch_time: float) -> None:
        p, m, epoch = self.p, trainer.metrics or {}, trainer.epoch + 1
        if self._row_written == (p.iteration, epoch):
            return
        names = list(trainer.loss_names)
        row = {f"train_{k}": float(v) for k, v in (trainer.tloss or {}).items()}
        if p.validated:
            row.update({ours: m.get(theirs) for ours, theirs in facts.METRIC_KEYS.items()})
            row.update({f"val_{k}": m.get(f"val/{k}") for k in names})
        row.update(
            epoch=epoch, lr=float(trainer.lr.get("lr/pg0", 0.0)), epoch_time_s=epoch_time,
            images_per_s=p.epoch_images / p.epoch_train_time if p.epoch_train_time else None,
            peak_gpu_mem_gb=gpu_gb(trainer, peak=True),
            **p.epoch_extra,
        )
        self.rec.epoch(names, row)
        self._row_written = (p.iteration, epoch)
        if row.get("map50_95") is not None and (p.best is None or row["map50_95"] > p.best["map50_95"]):
            p.best = {"epoch": row["epoch"], "map50_95": row["map50_95"], "map50": row["map50"]}

    def _write_progress(self, trainer) -> None:
        p = self.p
        if self._progress_written == (p.iteration, trainer.epoch):
            return
        self.rec.update(progress={"epochs_completed": trainer.epoch + 1, "epochs": trainer.epochs,
                                  "iterations_completed": p.iteration, "images_seen": p.images_seen,
                                  "optimizer_steps": p.opt_steps, "best": p.best},
                        data_wait=data_wait(p))
        self._progress_written = (p.iteration, trainer.epoch)


def data_wait(p: Progress) -> dict | None:
    """run.json's data_wait: seconds the training loop waited for batches, and their share of iteration time.

    Counted since this process started training (a resume starts again); iterations.csv's data_time_s
    holds the same wait per iteration.
    """
    if not p.train_s:
        return None
    return {"seconds": round(p.data_wait_s, 3), "share": round(p.data_wait_s / p.train_s, 4),
            "iteration_seconds": round(p.train_s, 3)}


def attach(trainer, rec: Recorder) -> Progress:
    """Register the listeners on a trainer (run state first, the row writers last) and return their Progress.

    The gradient-noise listener (unless the run turned it off) sits before the row writers, so
    the row of an iteration or epoch carries its figures; the trainer's optimizer_step calls it too.
    """
    p = Progress()
    trainer.grad_meter = gradstats.GradNoise(p) if gradstats.enabled(rec.read()) else None
    meters = (trainer.grad_meter,) if trainer.grad_meter else ()
    for listener in (RunState(rec, p), *meters, IterationRows(rec, p), EpochRows(rec, p)):
        if listener in meters and not hasattr(listener, BEFORE_CHECKPOINT):
            # The epoch's row is written before its checkpoint, ahead of on_fit_epoch_end: the meter's
            # epoch figures must be ready by then (computing them twice is harmless).
            trainer.add_callback(BEFORE_CHECKPOINT, listener.on_fit_epoch_end)
        for event in ("on_pretrain_routine_end", "on_train_epoch_start", "on_train_batch_start",
                      "on_train_batch_end", BEFORE_CHECKPOINT, "on_model_save", "on_fit_epoch_end"):
            if hasattr(listener, event):
                trainer.add_callback(event, getattr(listener, event))
    return p
