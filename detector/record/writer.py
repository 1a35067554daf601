"""Writes a run folder: run.json, iterations.csv and epochs.csv (the run-directory contract).

The recorder knows nothing of Ultralytics: the trainer's callbacks copy the few
fields they need into plain dicts and hand them here. Rows are written whole and
flushed one at a time, so a run killed at any moment leaves complete rows only;
run.json is replaced atomically (write a temp file, rename), so it is never half
written. Values are written raw; smoothing belongs to the reader (record.runs).
"""

from __future__ import annotations

import csv
import io
import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

from detector import fileio

RUN_JSON = "run.json"
ITERATIONS_CSV = "iterations.csv"
EPOCHS_CSV = "epochs.csv"

ITERATION_HEAD = ["epoch", "iteration", "epoch_iteration", "batch_size", "images_seen", "optimizer_step"]
# grad_norm and the grad_* epoch columns came later: runs written before lack them (read as empty).
ITERATION_TAIL = ["loss", "lr", "time_s", "iter_time_s", "data_time_s", "gpu_mem_gb", "grad_norm"]
EPOCH_METRICS = ["precision", "recall", "map50", "map50_95"]
EPOCH_TAIL = ["lr", "epoch_time_s", "images_per_s", "peak_gpu_mem_gb", "grad_noise_scale", "grad_norm_sq",
              "grad_trace_sigma", "grad_noise_scale_low", "grad_noise_scale_high"]


def now_iso() -> str:
    """The current time as ISO 8601 UTC with seconds."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def iteration_columns(loss_names: list[str]) -> list[str]:
    """iterations.csv columns for a model whose loss terms are loss_names."""
    return ITERATION_HEAD + list(loss_names) + ITERATION_TAIL


def epoch_columns(loss_names: list[str]) -> list[str]:
    """epochs.csv columns for a model whose loss terms are loss_names."""
    train = [f"train_{n}" for n in loss_names]
    val = [f"val_{n}" for n in loss_names]
    return ["epoch"] + train + EPOCH_METRICS + val + EPOCH_TAIL


def _fmt(value: Any) -> str:
    """One CSV cell: empty for None, 6 significant digits for floats (as Ultralytics' results.csv)."""
    if value is None:
        return ""
    if isinstance(value, float):
        return "%.6g" % value
    return str(value)


def write_json_atomic(path: Path, data: dict) -> None:
    """Replace path with data as JSON so a reader never sees a half-written file (detector.fileio)."""
    fileio.write_json(path, data)


class _CsvLog:
    """An append-only CSV file with a header fixed at the first row."""

    def __init__(self, path: Path):
        self.path = path
        self.columns: list[str] | None = None
        self._file: io.TextIOWrapper | None = None
        if path.exists() and path.stat().st_size:
            with open(path, newline="", encoding="utf-8") as f:
                self.columns = next(csv.reader(f), None)

    def append(self, columns: list[str], row: dict) -> dict[str, str]:
        """Write one row; return its cells as written (column -> text)."""
        if self._file is None:
            new = self.columns is None
            if new:
                self.columns = columns
            self._file = open(self.path, "a", newline="", encoding="utf-8")
            if new:
                self._file.write(",".join(self.columns) + "\n")
        cells = {c: _fmt(row.get(c)) for c in self.columns}
        # One write and one flush per row: a kill leaves whole rows behind.
        self._file.write(",".join(cells.values()) + "\n")
        self._file.flush()
        return cells

    def keep(self, predicate: Callable[[dict], bool]) -> list[dict]:
        """Rewrite the file keeping complete rows for which predicate holds; return the kept rows."""
        self.close()
        if not self.path.exists():
            return []
        with open(self.path, newline="", encoding="utf-8") as f:
            text = f.read()
        if not text.endswith("\n"):  # a row cut short by a kill: drop it
            text = text[: text.rfind("\n") + 1]
        rows = list(csv.DictReader(io.StringIO(text)))
        kept = [r for r in rows if None not in r and all(v is not None for v in r.values()) and predicate(r)]
        with fileio.atomic(self.path, "w", newline="") as f:
            if self.columns:
                f.write(",".join(self.columns) + "\n")
                for r in kept:
                    f.write(",".join(r[c] for c in self.columns) + "\n")
        return kept

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


class Recorder:
    """Owns the files of one run folder; every method leaves them parseable."""

    def __init__(self, run_dir: Path):
        self.run_dir = Path(run_dir)
        self.run_json = self.run_dir / RUN_JSON
        self.iterations = _CsvLog(self.run_dir / ITERATIONS_CSV)
        self.epochs = _CsvLog(self.run_dir / EPOCHS_CSV)
        # Objects with iteration(cells) / epoch(cells), handed each row's cells exactly as written
        # (TensorBoard's live writer, record.tensorboard.LiveWriter).
        self.listeners: list = []

    # run.json -------------------------------------------------------------
    def read(self) -> dict:
        """The current run.json, or {} before the run started."""
        if not self.run_json.exists():
            return {}
        return json.loads(self.run_json.read_text(encoding="utf-8"))

    def update(self, **fields: Any) -> dict:
        """Merge fields into run.json (top-level keys replaced) and write it atomically."""
        data = {**self.read(), **fields}
        write_json_atomic(self.run_json, data)
        return data

    def merge(self, key: str, **fields: Any) -> dict:
        """Update some fields of one run.json entry (e.g. batch.used), keeping its others."""
        return self.update(**{key: {**(self.read().get(key) or {}), **fields}})

    def start(self, meta: dict) -> None:
        """Write run.json for a new run with status running."""
        self.update(**{"events": [], **meta}, status="running", started=now_iso(), finished=None)

    def event(self, kind: str, **details: Any) -> None:
        """Append an event (out-of-memory step-down, resume, ...) to run.json's events."""
        data = self.read()
        events = data.get("events") or []
        events.append({"type": kind, "time": now_iso(), **details})
        self.update(events=events)

    def oom_step_down(self, *, epoch, iteration, epoch_iteration, phase: str, from_batch: int, to_batch: int,
                      action: str, discarded_iterations: int | None = None) -> None:
        """The one writer of `oom_step_down` events: where memory ran out, the batches, and what happened next."""
        self.event("oom_step_down", epoch=epoch, iteration=iteration, epoch_iteration=epoch_iteration, phase=phase,
                   action=action, discarded_iterations=discarded_iterations, **{"from": from_batch, "to": to_batch})

    def batch_used(self, batch: int) -> None:
        """The one writer of run.json's `batch.used`: the batch the trainer is training with now."""
        self.merge("batch", used=int(batch))

    def finish(self, status: str, error: str | None = None, **fields: Any) -> None:
        """Close the CSV files and mark the run completed, interrupted or failed."""
        self.close()
        extra = {"error": error} if error else {}
        self.update(**fields, **extra, status=status, finished=now_iso())

    # CSV rows -------------------------------------------------------------
    def iteration(self, loss_names: list[str], row: dict) -> None:
        """Append one training iteration."""
        cells = self.iterations.append(iteration_columns(loss_names), row)
        for listener in self.listeners:
            listener.iteration(cells)

    def epoch(self, loss_names: list[str], row: dict) -> None:
        """Append one completed epoch."""
        cells = self.epochs.append(epoch_columns(loss_names), row)
        for listener in self.listeners:
            listener.epoch(cells)

    def keep_epochs_through(self, last_epoch: int) -> dict | None:
        """Drop rows of epochs after last_epoch (1-based) from both CSVs; return the last kept iteration row.

        Used when Ultralytics redoes an epoch (out-of-memory batch halving, NaN
        recovery) and when a run resumes from the checkpoint of last_epoch, so
        iteration numbers are never repeated and no orphan rows remain.
        """
        kept = self.iterations.keep(lambda r: int(r["epoch"]) <= last_epoch)
        self.epochs.keep(lambda r: int(r["epoch"]) <= last_epoch)
        return kept[-1] if kept else None

    def close(self) -> None:
        self.iterations.close()
        self.epochs.close()
