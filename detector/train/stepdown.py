"""Surviving out-of-memory during training: step down to the next smaller candidate and resume.

Ultralytics 8.4 halves the batch after an out-of-memory error only in a training
step of the first epoch it runs (of a run, or after a resume) on one GPU
(trainer._do_train), and re-raises it everywhere else: in later epochs and in
validation. Here such an error (already
turned into DeviceOutOfMemory by the adapter, with the device memory freed) makes
the run continue from its last completed epoch (weights/last.pt, which
Ultralytics lets a resume override the batch of) at the next smaller
candidate; before the first checkpoint exists the run restarts from scratch.
The recording trainer trims the unfinished epoch's rows when it resumes, so
iterations.csv and epochs.csv stay consistent; run.json gets an
`oom_step_down` event with where it happened.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from detector import facts
from detector.errors import BatchError, DeviceOutOfMemory
from detector.record.writer import Recorder
from detector.train import batching

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Attempt:
    """One call into the trainer: a training from ul_args (which name the model), or a resume of checkpoint."""

    ul_args: dict
    checkpoint: Path | None = None

    def fit_once(self, recorder: Recorder) -> dict:
        from detector.yolo import recording

        if self.checkpoint is None:
            return recording.train(self.ul_args, recorder)
        return recording.resume(self.checkpoint, self.ul_args, recorder)


def fit(attempt: Attempt, run_dir: Path, recorder: Recorder, candidates) -> dict:
    """Fit attempt; after each out-of-memory error fit the next one at a smaller candidate, until one finishes."""
    while True:
        try:
            return attempt.fit_once(recorder)
        except DeviceOutOfMemory as oom:
            attempt = _after_oom(oom, attempt, run_dir, recorder, candidates)


def _after_oom(oom: DeviceOutOfMemory, failed: Attempt, run_dir: Path, recorder: Recorder, candidates) -> Attempt:
    """The attempt that continues after oom at the next smaller candidate, recorded as an oom_step_down event."""
    smaller = _next_batch(oom, candidates, run_dir)
    where = {"epoch": oom.epoch, "iteration": oom.iteration, "epoch_iteration": oom.epoch_iteration,
             "phase": oom.phase, "from_batch": oom.batch, "to_batch": smaller}
    last = run_dir / "weights" / "last.pt"
    if last.is_file():  # the checkpoint of the last completed epoch
        recorder.oom_step_down(**where, action=f"resumed from {last.relative_to(run_dir)}")
        log.info(f"out of memory at batch {oom.batch} ({_at(where)}); resuming from the last completed epoch "
                     f"at batch {smaller}")
        device = {"device": failed.ul_args["device"]} if "device" in failed.ul_args else {}
        return Attempt({**device, "batch": smaller}, last)
    if "model" in failed.ul_args:  # before the first epoch ended there is nothing to resume from
        recorder.oom_step_down(**where, action="restarted from scratch (no checkpoint yet)")
        log.info(f"out of memory at batch {oom.batch} ({_at(where)}); restarting at batch {smaller}")
        return Attempt({**failed.ul_args, "batch": smaller})
    raise BatchError(f"out of memory at batch {oom.batch} and {last} is gone, so the run cannot "
                     f"continue; start a new run with --batch {smaller}")


def _next_batch(oom: DeviceOutOfMemory, candidates: tuple, run_dir: Path) -> int:
    """The candidate to continue with, or BatchError saying what to change."""
    if oom.phase == "final validation":
        raise BatchError(f"out of memory validating best.pt at batch {facts.val_batch(oom.batch)} after the last epoch; the "
                         f"trained weights are in {run_dir / 'weights'}: run 'yolo val' on them with a smaller batch")
    smaller = batching.step_down(oom.batch, candidates)
    if smaller is None:
        at = _at({"epoch": oom.epoch, "phase": oom.phase, "iteration": oom.iteration})
        raise BatchError(f"out of memory at batch {oom.batch} ({at}) and no smaller candidate is left in "
                         f"--batch-candidates {','.join(map(str, candidates))}; add a smaller one (e.g. "
                         f"--batch-candidates {max(oom.batch // 2, 1)},{','.join(map(str, candidates))}) or lower "
                         f"--imgsz in a new run, or continue this one with --resume {run_dir} --batch "
                         f"{max(oom.batch // 2, 1)}")
    return smaller


def _at(where: dict) -> str:
    if not where.get("epoch"):
        return where.get("phase") or "setup"
    it = f", iteration {where['iteration']}" if where.get("phase") == "training" and where.get("iteration") else ""
    return f"epoch {where['epoch']} {where['phase']}{it}"
