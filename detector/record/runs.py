"""Reads a run folder back: run.json, iterations.csv and epochs.csv (the read side of record.writer).

A run may be read while it trains or after it was killed: a last CSV line cut
short is dropped, a run still `running` (or with no rows yet) is read as far as
it goes and says so in `notes`. Values come back raw, as numpy arrays with NaN
for empty cells; smoothing (`ema`) happens here, at read time, never in the
recorder.
"""

from __future__ import annotations

import csv
import io
import json
import os
import platform
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from detector.errors import RunDirError
from detector.record.writer import EPOCHS_CSV, ITERATION_HEAD, ITERATION_TAIL, ITERATIONS_CSV, RUN_JSON


@dataclass
class Table:
    """The columns of one CSV file, each a float array of the same length (NaN where empty)."""

    columns: list[str] = field(default_factory=list)
    values: dict[str, np.ndarray] = field(default_factory=dict)
    truncated: bool = False  # a last line cut short was dropped

    def __len__(self) -> int:
        return len(next(iter(self.values.values()))) if self.values else 0

    def get(self, column: str) -> np.ndarray | None:
        """The column as floats, or None when the file has no such column."""
        return self.values.get(column)


@dataclass
class Run:
    """One run folder as read from disk."""

    path: Path
    meta: dict
    iterations: Table
    epochs: Table
    notes: list[str] = field(default_factory=list)  # what a reader should know: still running, no rows, ...

    @property
    def name(self) -> str:
        return self.meta.get("name") or self.path.name

    @property
    def status(self) -> str:
        return self.meta.get("status") or "unknown"

    @property
    def finished(self) -> bool:
        return self.status == "completed"

    @property
    def loss_terms(self) -> list[str]:
        """The per-iteration loss terms this run recorded (box_loss, cls_loss, ... for YOLO11)."""
        cols = self.iterations.columns
        return [c for c in cols if c not in ITERATION_HEAD and c not in ITERATION_TAIL]

    @property
    def val_loss_terms(self) -> list[str]:
        """The val loss columns of epochs.csv (val_box_loss, ...)."""
        return [c for c in self.epochs.columns if c.startswith("val_")]

    @property
    def train_loss_terms(self) -> list[str]:
        """The mean train loss columns of epochs.csv (train_box_loss, ...)."""
        return [c for c in self.epochs.columns if c.startswith("train_")]


def _read_table(path: Path) -> Table:
    """Parse a recorder CSV; a missing or empty file is an empty table, a torn last line is dropped."""
    if not path.exists():
        return Table()
    text = path.read_text(encoding="utf-8", errors="replace")
    truncated = bool(text) and not text.endswith("\n")
    if truncated:  # the writer was killed mid-row: keep complete lines only
        text = text[: text.rfind("\n") + 1]
    rows = list(csv.reader(io.StringIO(text)))
    if not rows:
        return Table(truncated=truncated)
    columns, body = rows[0], [r for r in rows[1:] if r]
    good = [r for r in body if len(r) == len(columns)]
    truncated = truncated or len(good) != len(body)
    values = {c: np.array([_num(r[i]) for r in good], dtype=float) for i, c in enumerate(columns)}
    return Table(columns=columns, values=values, truncated=truncated)


def _num(cell: str) -> float:
    try:
        return float(cell) if cell.strip() else float("nan")
    except ValueError:
        return float("nan")


def _run_json(path: Path) -> dict:
    file = path / RUN_JSON
    if not path.is_dir():
        raise RunDirError(f"{path} is not a folder; pass run folders such as runs/NAME")
    if not file.is_file():
        raise RunDirError(f"{path} is not a detector run (no run.json); pass folders written by 'detector train'")
    try:
        meta = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise RunDirError(f"{file} cannot be read as JSON ({e}); the run folder is damaged") from None
    if not isinstance(meta, dict):
        raise RunDirError(f"{file} is not a run record (expected a JSON object)")
    return meta


def process_gone(meta: dict) -> bool:
    """True when run.json names a process on this host that no longer exists (a SIGKILL, a power cut)."""
    pid, host = meta.get("pid"), meta.get("host")
    if not isinstance(pid, int) or host != platform.node():
        return False  # written elsewhere, or by an older version: cannot tell
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, owned by someone else
        return False
    return False


def load(path: str | Path) -> Run:
    """Read one run folder; raise RunDirError when it is not a run."""
    path = Path(path).expanduser().resolve()
    meta = _run_json(path)
    run = Run(path=path, meta=meta, iterations=_read_table(path / ITERATIONS_CSV),
              epochs=_read_table(path / EPOCHS_CSV))
    status = run.status
    if status == "running" and process_gone(meta):
        run.notes.append(f"killed without a trace (its process {meta['pid']} is gone); read as far as it got, "
                         f"continue it with detector train --resume {path}")
    elif status == "running":
        run.notes.append("still running (or killed without a trace): read as far as it has got")
    elif status in {"interrupted", "failed"}:
        why = f": {meta['error']}" if meta.get("error") else ""
        run.notes.append(f"{status}{why}; read as far as it got")
    if not len(run.iterations):
        run.notes.append("no training iterations recorded yet")
    if not len(run.epochs):
        run.notes.append("no completed epoch yet (no mAP)")
    if run.iterations.truncated or run.epochs.truncated:
        run.notes.append("an incomplete last CSV row was skipped")
    return run


def find(paths) -> list[Path]:
    """Run folders named by paths; a folder holding runs (a sweep) stands for the runs inside it."""
    found: list[Path] = []
    for p in map(lambda x: Path(x).expanduser(), paths):
        if p.is_dir() and not (p / RUN_JSON).exists():
            inner = sorted(c for c in p.iterdir() if c.is_dir() and (c / RUN_JSON).is_file())
            if inner:
                found.extend(inner)
                continue
        found.append(p)
    unique = {str(p.resolve()): p for p in found}  # the same run named twice is compared once
    return list(unique.values())


def ema(values: np.ndarray, weight: float = 0.9) -> np.ndarray:
    """Exponential moving average with TensorBoard's debiasing (the first points are not pulled to 0); NaNs skipped."""
    out = np.full(len(values), np.nan)
    avg, norm = 0.0, 0.0
    for i, v in enumerate(values):
        if np.isnan(v):
            continue
        avg = weight * avg + (1 - weight) * v
        norm = weight * norm + (1 - weight)
        out[i] = avg / norm
    return out


def smoothing_weight(n: int) -> float:
    """An EMA weight that smooths over about 5% of n points (at least 3, at most 100)."""
    span = min(max(n / 20, 3), 100)
    return 1 - 1 / span


def steps_per_epoch(run: Run) -> dict[int, int]:
    """Optimizer steps taken in each recorded epoch, from iterations.csv's cumulative optimizer_step."""
    ep, step = run.iterations.get("epoch"), run.iterations.get("optimizer_step")
    if ep is None or step is None or not len(ep):
        return {}
    out, before = {}, 0
    for e in sorted(set(int(x) for x in ep if not np.isnan(x))):
        last = np.nanmax(step[ep == e])
        out[e] = int(last - before)
        before = last
    return out
