"""Time to accuracy: when each run first reached a share of the best mAP50-95 among the compared runs.

Pure functions of runs read by detector.record.runs. An epoch's mAP is known at
its end, so a run "reaches" a target at the end of the first epoch whose mAP50-95
is at least the target; wall time there is the sum of its epoch times (training
and validation, as in the mAP-against-time plot), images seen and optimizer steps
are the counters of iterations.csv at that epoch's last iteration.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from detector.record.runs import Run

SHARES = (0.5, 0.9)


@dataclass(frozen=True)
class Reach:
    """Where a run first reached a target mAP50-95."""

    epoch: int
    time_s: float | None
    images: int | None
    steps: int | None


def best_map(runs: list[Run]) -> float | None:
    """The best mAP50-95 of any epoch of any run; None when no run has one."""
    vals = [np.nanmax(m) for r in runs if (m := r.epochs.get("map50_95")) is not None and np.any(~np.isnan(m))]
    return float(max(vals)) if vals else None


def _at_epoch_end(run: Run, column: str, epoch: int) -> int | None:
    ep, vals = run.iterations.get("epoch"), run.iterations.get(column)
    if ep is None or vals is None:
        return None
    sel = vals[(ep <= epoch) & ~np.isnan(vals)]
    return int(sel.max()) if len(sel) else None


def reach(run: Run, target: float) -> Reach | None:
    """The first epoch whose mAP50-95 is at least target, with time, images and steps there; None: never."""
    m, ep = run.epochs.get("map50_95"), run.epochs.get("epoch")
    if m is None or ep is None:
        return None
    hits = np.flatnonzero(m >= target - 1e-12)  # NaN compares False: epochs without validation never count
    if not len(hits):
        return None
    i = int(hits[0])
    times = run.epochs.get("epoch_time_s")
    time_s = float(np.nansum(times[: i + 1])) if times is not None else None
    epoch = int(ep[i])
    return Reach(epoch, time_s, _at_epoch_end(run, "images_seen", epoch), _at_epoch_end(run, "optimizer_step", epoch))


def table(runs: list[Run], shares=SHARES) -> tuple[float | None, dict[str, dict[float, Reach | None]]]:
    """(best mAP50-95, per run name: per share of it, where the run reached it or None)."""
    best = best_map(runs)
    if best is None:
        return None, {}
    return best, {r.name: {s: reach(r, s * best) for s in shares} for r in runs}


def cell(r: Reach | None) -> str:
    """One table cell: 'never', or time, images, steps and epoch."""
    if r is None:
        return "never"
    t = "–" if r.time_s is None else f"{r.time_s:.0f} s"
    images = "–" if r.images is None else f"{r.images:,}"
    steps = "–" if r.steps is None else f"{r.steps:,}"
    return f"{t}, {images} images, {steps} steps (epoch {r.epoch})"


def rows(runs: list[Run], shares=SHARES) -> tuple[list[str], list[list[str]]]:
    """The report's table: header and one row per run (the columns are the shares of the best)."""
    best, t = table(runs, shares)
    if best is None:
        return [], []
    head = ["run"] + [f"to {int(s * 100)}% of best ({s * best:.3f})" for s in shares]
    return head, [[name, *(cell(per[s]) for s in shares)] for name, per in t.items()]
