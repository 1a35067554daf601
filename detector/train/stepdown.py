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

from pathlib import Path
from typing import Callable

from detector import facts
from detector.errors import BatchError, DeviceOutOfMemory
from detector.record.writer import Recorder
from detector.train import batching


def train(ul_args: dict, run_dir: Path, recorder: Recorder, candidates, echo=print) -> dict:
    """Train ul_args with the record attached, stepping down on out-of-memory; returns the last attempt's outcome."""
    from detector.yolo import trainer

    return _fit(lambda: trainer.train(ul_args, recorder), ul_args, run_dir, recorder, candidates, echo)


def resume(last: Path, ul_args: dict, run_dir: Path, recorder: Recorder, candidates, echo=print) -> dict:
    """Continue from last.pt (a user's --resume), stepping down on out-of-memory."""
    from detector.yolo import trainer

    return _fit(lambda: trainer.resume(last, ul_args, recorder), ul_args, run_dir, recorder, candidates, echo)


def _fit(attempt: Callable[[], dict], ul_args: dict, run_dir: Path, recorder: Recorder, candidates, echo) -> dict:
    from detector.yolo import trainer

    last = run_dir / "weights" / "last.pt"
    while True:
        try:
            return attempt()
        except DeviceOutOfMemory as oom:
            smaller = _next_batch(oom, candidates, run_dir)
            failed = oom.batch
            where = {"epoch": oom.epoch, "iteration": oom.iteration, "epoch_iteration": oom.epoch_iteration,
                     "phase": oom.phase, "from_batch": oom.batch, "to_batch": smaller}
        device = {"device": ul_args["device"]} if "device" in ul_args else {}
        if last.is_file():  # the checkpoint of the last completed epoch
            recorder.oom_step_down(**where, action=f"resumed from {last.relative_to(run_dir)}")
            echo(f"out of memory at batch {failed} ({_at(where)}); resuming from the last completed epoch "
                 f"at batch {smaller}")
            attempt = lambda b=smaller: trainer.resume(last, {**device, "batch": b}, recorder)  # noqa: E731
        elif "model" in ul_args:  # before the first epoch ended there is nothing to resume from
            recorder.oom_step_down(**where, action="restarted from scratch (no checkpoint yet)")
            echo(f"out of memory at batch {failed} ({_at(where)}); restarting at batch {smaller}")
            ul_args = {**ul_args, "batch": smaller}
            attempt = lambda a=ul_args: trainer.train(a, recorder)  # noqa: E731
        else:
            raise BatchError(f"out of memory at batch {failed} and {last} is gone, so the run cannot "
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
