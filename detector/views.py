"""What the Python API returns: a run, a report and a sweep as objects that show themselves in Jupyter.

A Run reads its folder (record.runs): run.json's facts as attributes, the CSVs
as pandas DataFrames (pandas is imported when a table is first asked for), the
weights' paths, and `_repr_html_` a summary with a small loss/mAP plot as an
inline PNG. A Report shows the comparison page inline (in an iframe, so its
styles stay inside). Nothing here trains or imports torch.
"""

from __future__ import annotations

import base64
import html
import io
import math
from pathlib import Path

from detector.record import runs

# iterations.csv / epochs.csv columns that are counts, shown as integers.
INTEGER_COLUMNS = ("epoch", "iteration", "epoch_iteration", "batch_size", "images_seen", "optimizer_step")


class Run:
    """One run folder: `run.epochs`, `run.iterations` (DataFrames), `run.status`, `run.batch`, `run.best`, ..."""

    def __init__(self, record: runs.Run):
        self._record = record
        self._frames: dict = {}

    @classmethod
    def open(cls, path) -> "Run":
        return cls(runs.load(path))

    def refresh(self) -> "Run":
        """The same folder read again (a run still training has more rows now)."""
        return Run.open(self.path)

    @property
    def path(self) -> Path:
        return self._record.path

    @property
    def name(self) -> str:
        return self._record.name

    @property
    def status(self) -> str:
        return self._record.status

    @property
    def meta(self) -> dict:
        """run.json as read."""
        return self._record.meta

    @property
    def notes(self) -> list[str]:
        """What a reader should know: still running, interrupted, no epoch yet, ..."""
        return list(self._record.notes)

    def __getattr__(self, key: str):
        # run.json's facts (config, batch, dataset, device, nbs, events, final, mlflow, ...) as attributes
        meta = self.__dict__.get("_record")
        if meta is not None and not key.startswith("_") and key in meta.meta:
            return meta.meta[key]
        raise AttributeError(f"{type(self).__name__} has no attribute {key!r} (run.json has no {key!r} either)")

    def __dir__(self):
        return sorted({*super().__dir__(), *self._record.meta})

    @property
    def best(self) -> Path | None:
        """weights/best.pt, or None before the first epoch ended."""
        return self._weights("best.pt")

    @property
    def last(self) -> Path | None:
        """weights/last.pt, or None before the first epoch ended."""
        return self._weights("last.pt")

    def _weights(self, name: str) -> Path | None:
        path = self.path / "weights" / name
        return path if path.is_file() else None

    @property
    def epochs(self):
        """epochs.csv as a pandas DataFrame: one row per completed epoch."""
        return self._frame("epochs", self._record.epochs)

    @property
    def iterations(self):
        """iterations.csv as a pandas DataFrame: one row per training iteration."""
        return self._frame("iterations", self._record.iterations)

    def _frame(self, key: str, table: runs.Table):
        if key not in self._frames:
            import pandas as pd

            frame = pd.DataFrame({c: table.values[c] for c in table.columns}, columns=table.columns)
            for c in INTEGER_COLUMNS:
                if c in frame and len(frame) and not frame[c].isna().any():
                    frame[c] = frame[c].astype(int)
            self._frames[key] = frame
        return self._frames[key]

    def summary(self) -> dict:
        """The facts the notebook view shows: status, batch, epochs, best mAP, time."""
        meta, ep = self.meta, self._record.epochs
        batch = meta.get("batch") or {}
        config = meta.get("config") or {}
        out = {"name": self.name, "status": self.status, "model": meta.get("model"),
               "batch": f"{batch.get('requested')} -> {batch.get('used', batch.get('chosen'))}",
               "nbs": meta.get("nbs"), "epochs": f"{len(ep)} of {(config.get('ultralytics') or {}).get('epochs', '?')}"}
        for column in ("map50", "map50_95"):
            values = ep.get(column)
            if values is not None and len(values) and not all(math.isnan(v) for v in values):
                out[f"best {column}"] = round(float(max(v for v in values if not math.isnan(v))), 4)
        times = self._record.iterations.get("time_s")
        if times is not None and len(times):
            out["train time"] = f"{float(times[-1]):.0f} s"
        if (meta.get("mlflow") or {}).get("run_id"):
            out["mlflow"] = f"{meta['mlflow']['run_id']} at {meta['mlflow']['uri']}"
        return out

    def plot_png(self) -> bytes:
        """A small figure: the loss per iteration (raw and smoothed) and mAP per epoch, as PNG bytes."""
        from matplotlib.figure import Figure

        fig = Figure(figsize=(8, 2.8), dpi=80)
        loss_ax, map_ax = fig.subplots(1, 2)
        it, ep = self._record.iterations, self._record.epochs
        if it.get("loss") is not None and len(it):
            loss = it.get("loss")
            loss_ax.plot(it.get("iteration"), loss, alpha=0.3, color="C0")
            loss_ax.plot(it.get("iteration"), runs.ema(loss, runs.smoothing_weight(len(loss))), color="C0")
        loss_ax.set(title="training loss", xlabel="iteration")
        for column in ("map50", "map50_95"):
            if ep.get(column) is not None and len(ep):
                map_ax.plot(ep.get("epoch"), ep.get(column), marker="o", label=column)
        map_ax.set(title="validation mAP", xlabel="epoch")
        if len(ep):
            map_ax.legend()
        fig.tight_layout()
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png")
        return buffer.getvalue()

    def _repr_html_(self) -> str:
        rows = "".join(f"<tr><th style='text-align:left'>{html.escape(str(k))}</th><td style='text-align:left'>"
                       f"{html.escape(str(v))}</td></tr>" for k, v in self.summary().items())
        notes = "".join(f"<li>{html.escape(n)}</li>" for n in self.notes)
        png = base64.b64encode(self.plot_png()).decode()
        return (f"<div><b>Run {html.escape(str(self.path))}</b><table>{rows}</table>"
                f"{f'<ul>{notes}</ul>' if notes else ''}<img src='data:image/png;base64,{png}'/></div>")

    def __repr__(self) -> str:
        return f"Run({str(self.path)!r}, status={self.status!r}, epochs={len(self._record.epochs)})"


class Report:
    """A comparison report: report.html (shown inline), report.md and plots/ beside it."""

    def __init__(self, path):
        self.path = Path(path)

    @property
    def markdown(self) -> Path:
        return self.path.with_name("report.md")

    @property
    def html(self) -> str:
        return self.path.read_text(encoding="utf-8")

    def _repr_html_(self) -> str:
        # An iframe keeps the page's styles from restyling the notebook around it.
        return (f'<iframe title="detector report" srcdoc="{html.escape(self.html, quote=True)}" '
                'style="width:100%;height:720px;border:1px solid #ddd"></iframe>')

    def __repr__(self) -> str:
        return f"Report({str(self.path)!r})"


class Sweep:
    """A sweep folder: its runs and its report."""

    def __init__(self, folder):
        self.path = Path(folder)

    @property
    def report(self) -> Report:
        return Report(self.path / "report.html")

    @property
    def runs(self) -> list[Run]:
        return [Run.open(p) for p in runs.find([self.path])]

    def _repr_html_(self) -> str:
        return self.report._repr_html_()

    def __repr__(self) -> str:
        return f"Sweep({str(self.path)!r}, runs={len(self.runs)})"
