"""Training progress for the Python API: one line per epoch instead of Ultralytics' per-iteration bars.

While an API call trains, `shown(project)` prints the library's own messages
(the `detector` loggers: batch decision, step-downs, the MLflow line), quietens
Ultralytics' logger to warnings (which also turns off its progress bars: they
draw only when that logger shows INFO), and follows the run folders this process
writes under PROJECT, printing one line as each epoch lands in epochs.csv. The
lines are read from the record, never from the trainer, so they are the figures
the run keeps. Everything is put back as it was when the call returns.
"""

from __future__ import annotations

import contextlib
import csv
import json
import logging
import os
import sys
import threading
import time
from pathlib import Path

POLL_S = 1.0


class _PrintHandler(logging.Handler):
    """The library's messages printed one a line (a notebook shows them under the running cell)."""

    def emit(self, record: logging.LogRecord) -> None:
        print(self.format(record), file=sys.stdout, flush=True)


@contextlib.contextmanager
def shown(project):
    """Within the block: detector's messages printed, Ultralytics at warnings only, one line per new epoch."""
    ours, ul = logging.getLogger("detector"), logging.getLogger("ultralytics")
    saved = (ours.level, ours.propagate)
    handler = None
    if not ours.handlers:  # a caller's own logging setup (or the CLI's) is left alone
        handler = _PrintHandler()
        ours.addHandler(handler)
        ours.propagate = False
    if ours.getEffectiveLevel() > logging.INFO:
        ours.setLevel(logging.INFO)
    import detector.yolo.hermetic  # noqa: F401  (Ultralytics sets its logger's level when first imported: first)

    ul_level = ul.level
    ul.setLevel(logging.WARNING)
    follower = EpochLines(Path(project)) if project is not None else None
    try:
        yield
    finally:
        if follower is not None:
            follower.stop()
        if handler is not None:
            ours.removeHandler(handler)
        ours.setLevel(saved[0])
        ours.propagate = saved[1]
        ul.setLevel(ul_level)


class EpochLines:
    """Follows the run folders this process writes under a folder (runs, or a sweep's runs) and prints each epoch."""

    def __init__(self, folder: Path, out=None):
        self.folder, self.out = Path(folder).expanduser(), out
        self.since = time.time() - 1
        self._printed: dict[Path, int] = {}
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="detector-progress", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._done.wait(POLL_S):
            self.poll()

    def stop(self) -> None:
        self._done.set()
        self._thread.join()
        self.poll()

    def poll(self) -> None:
        """Print a line for every epoch written since the last poll."""
        try:
            for run_dir in self._runs():
                rows = _epoch_rows(run_dir / "epochs.csv")
                for row in rows[self._printed.get(run_dir, 0):]:
                    print(epoch_line(run_dir, row), file=self.out or sys.stdout, flush=True)
                self._printed[run_dir] = len(rows)
        except OSError:  # a folder being created or swapped: the next poll sees it whole
            pass

    def _runs(self) -> list[Path]:
        """Run folders (one or two levels down) whose run.json this process wrote since the call started."""
        found = []
        if not self.folder.is_dir():
            return found
        for meta in [*self.folder.glob("*/run.json"), *self.folder.glob("*/*/run.json")]:
            run_dir = meta.parent
            if run_dir in self._printed:
                found.append(run_dir)
                continue
            try:
                if meta.stat().st_mtime < self.since or json.loads(meta.read_text()).get("pid") != os.getpid():
                    continue
            except (OSError, ValueError):
                continue
            self._printed[run_dir] = 0
            found.append(run_dir)
        return found


def _epoch_rows(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    text = path.read_text(encoding="utf-8")
    text = text[: text.rfind("\n") + 1]  # complete rows only
    return [r for r in csv.DictReader(text.splitlines()) if None not in r.values()]


def epoch_line(run_dir: Path, row: dict) -> str:
    """'NAME epoch E/N: loss L, mAP50 M, mAP50-95 M (T s)' from one epochs.csv row and the run's run.json."""
    total = "?"
    with contextlib.suppress(OSError, ValueError):
        config = json.loads((run_dir / "run.json").read_text()).get("config") or {}
        total = (config.get("ultralytics") or {}).get("epochs", "?")
    losses = [float(v) for k, v in row.items() if k.startswith("train_") and v]
    parts = [f"loss {sum(losses):.3f}" if losses else None]
    for column, label in (("map50", "mAP50"), ("map50_95", "mAP50-95")):
        if row.get(column):
            parts.append(f"{label} {float(row[column]):.3f}")
    took = f" ({float(row['epoch_time_s']):.1f} s)" if row.get("epoch_time_s") else ""
    return f"{run_dir.name} epoch {row['epoch']}/{total}: {', '.join(p for p in parts if p)}{took}"
