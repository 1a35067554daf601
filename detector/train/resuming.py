"""What a resume can continue from: run.json, the checkpoints, and what is left to do.

`train.run.resume` asks here before it touches the run: a damaged run.json, a
run still training, or a torn last.pt is refused (or worked around) with one
line, and a run whose epochs all ended (interrupted in the final validation of
best.pt) only redoes that validation.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from detector.errors import RunDirError
from detector.record.writer import Recorder


@dataclass(frozen=True)
class ResumePlan:
    """`train`: continue from last.pt; `final`: every epoch ended, only the final validation is missing."""

    action: str
    last: Path
    note: str = ""  # what was lost, when a damaged last.pt forced an older checkpoint


def read_state(recorder: Recorder, run_dir: Path) -> dict:
    """run.json as a dict, or RunDirError when it is damaged."""
    try:
        state = recorder.read()
    except (json.JSONDecodeError, UnicodeDecodeError, OSError) as e:
        raise RunDirError(f"{run_dir / 'run.json'} is damaged ({type(e).__name__}); the run cannot be resumed, "
                          "start a new run") from None
    if not isinstance(state, dict):
        raise RunDirError(f"{run_dir / 'run.json'} is damaged (not a JSON object); the run cannot be resumed, "
                          "start a new run")
    return state


def plan(run_dir: Path) -> ResumePlan:
    """Decide what the resume does from the checkpoints in run_dir/weights."""
    from detector.yolo import checkpoints

    wdir = run_dir / "weights"
    checkpoints.remove_stale_temps(wdir)  # a write cut short by a kill; the file it was replacing is whole
    last, best = wdir / "last.pt", wdir / "best.pt"
    if not last.is_file():
        raise RunDirError(f"{run_dir} has no weights/last.pt: it stopped before its first epoch ended, so there is "
                          "nothing to resume; start a new run (it trains from scratch)")
    ckpt = checkpoints.read_checkpoint(last)
    note = ""
    if ckpt is None:
        older = checkpoints.read_checkpoint(best) if best.is_file() else None
        if older is None or older.get("epoch", -1) < 0 or older.get("optimizer") is None:
            raise RunDirError(f"{last} is damaged and no earlier checkpoint can replace it; the trained weights are "
                              "lost, start a new run")
        note = (f"{last} is damaged: resuming from best.pt (epoch {older['epoch'] + 1}); later epochs are "
                "trained again")
        checkpoints.write_bytes_atomic(last, best.read_bytes())
        ckpt = older
    epochs = int((ckpt.get("train_args") or {}).get("epochs") or 0)
    epoch = ckpt.get("epoch", -1)
    # Ultralytics strips last.pt (epoch -1) when training ends, before validating best.pt; a checkpoint of
    # the last epoch has nothing left to train either. Both only miss the final validation.
    finished = epoch == -1 or (epochs and epoch + 1 >= epochs)
    return ResumePlan("final" if finished else "train", last, note)
