"""Steps and images predicted from the gradient noise scale, set against the sweep's measured time to accuracy.

Pure functions of runs read by detector.record.runs. The noise scale late in training
(the median B_simple over each run's last third of epochs, with the median of those
epochs' 90% interval ends) is pooled over the runs (medians again); McCandlish et al.
2018 then predict, for B images per optimizer step, S/S_min = 1 + B_noise/B and
E/E_min = 1 + B/B_noise (detector.gradnoise.predict), given here relative to the
smallest candidate. Wall time follows from the predicted steps and each candidate's
measured seconds per step (images per step / images per second). The measurement they
are set against is report.timing's: where each run first reached half the best
mAP50-95, averaged over seeds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from detector import gradnoise
from detector.record.runs import Run
from detector.report import timing

SHARE = 0.5  # the accuracy the measurement is taken at: this share of the best mAP50-95


@dataclass(frozen=True)
class NoiseScale:
    """B_simple late in training: value, 90% interval (high None: unbounded), whether an interval was recorded."""

    value: float
    low: float | None
    high: float | None
    has_interval: bool

    @property
    def resolved(self) -> bool:
        return not self.has_interval or self.high is not None

    def text(self) -> str:
        """'about 96 (90% interval 72 to 138)', or 'unresolved' with the lower end when unbounded."""
        if not self.has_interval:
            return f"about {self.value:.0f} (no interval recorded)"
        if self.low is None:
            return f"about {self.value:.0f} (no interval: too few steps measured)"
        if self.high is None:
            return f"unresolved: at least {self.low:.0f}, unbounded above (90% interval; point value {self.value:.0f})"
        return f"about {self.value:.0f} (90% interval {self.low:.0f} to {self.high:.0f})"


def _late(col: np.ndarray | None, n: int) -> np.ndarray | None:
    if col is None:
        return None
    return col[len(col) - max(n // 3, 1):]


def late_noise(run: Run) -> NoiseScale | None:
    """Median B_simple over the last third of the run's epochs that have one, and the median interval ends there."""
    col, lo, hi = (run.epochs.get(k) for k in ("grad_noise_scale", "grad_noise_scale_low", "grad_noise_scale_high"))
    if col is None:
        return None
    keep = ~np.isnan(col)
    if not keep.any():
        return None
    n = int(keep.sum())
    value = float(np.median(_late(col[keep], n)))
    if lo is None or hi is None:
        return NoiseScale(value, None, None, False)
    lows = _late(lo[keep], n)
    highs = np.where(np.isnan(hi[keep]), np.inf, hi[keep])  # an empty high is unbounded
    highs = _late(highs, n)
    if np.isnan(lows).all():
        return NoiseScale(value, None, None, True)
    high = float(np.median(highs))
    return NoiseScale(value, float(np.nanmedian(lows)), high if math.isfinite(high) else None, True)


def pooled(runs: list[Run]) -> NoiseScale | None:
    """The runs' late noise scales pooled: medians of the values and of the interval ends (unbounded as ∞)."""
    each = [s for r in runs if (s := late_noise(r)) is not None]
    if not each:
        return None
    value = float(np.median([s.value for s in each]))
    if not all(s.has_interval for s in each):
        return NoiseScale(value, None, None, False)
    lows = [s.low for s in each if s.low is not None]
    if not lows:
        return NoiseScale(value, None, None, True)
    high = float(np.median([s.high if s.high is not None else np.inf for s in each]))
    return NoiseScale(value, float(np.median(lows)), high if math.isfinite(high) else None, True)


@dataclass
class Candidate:
    """One batch size: predicted and measured steps, images and wall time, each relative to the smallest candidate."""

    batch: int
    per_step: float
    steps: tuple  # (value, low, high)
    images: tuple
    time: float | None  # predicted wall time ratio (point), from measured seconds per step
    measured: dict  # steps / images / time ratios at SHARE of the best mAP50-95 (None: a run never got there)


def _measured(runs: list[Run], target: float | None) -> dict:
    hits = [timing.reach(r, target) if target is not None else None for r in runs]
    if not hits or any(h is None for h in hits):
        return {"steps": None, "images": None, "time": None}
    mean = {k: [getattr(h, k) for h in hits] for k in ("steps", "images", "time_s")}
    return {k.replace("_s", ""): (float(np.mean(v)) if all(x is not None for x in v) else None)
            for k, v in mean.items()}


def candidates(runs: list[Run], rows: list[dict], noise: NoiseScale) -> list[Candidate]:
    """Per batch size (smallest first), the prediction from the pooled noise scale and the measured reach."""
    by: dict = {}
    for run, row in zip(runs, rows):
        by.setdefault(row["batch_used"] or 0, []).append((run, row))
    best = timing.best_map(runs)
    target = SHARE * best if best is not None else None
    out, ref = [], None
    for batch, pairs in sorted(by.items()):
        per_step = float(np.mean([row["images_per_step"] or batch for _, row in pairs]))
        ips = [row["images_per_s"] for _, row in pairs if row.get("images_per_s")]
        sec = per_step / float(np.mean(ips)) if ips else None
        measured = _measured([r for r, _ in pairs], target)
        if ref is None:
            ref = (per_step, sec, measured)
        pred = gradnoise.predict(per_step, ref[0], noise.value, noise.low, noise.high)
        time = pred["steps"][0] * sec / ref[1] if sec and ref[1] else None
        rel = {k: (v / ref[2][k] if v is not None and ref[2][k] else None) for k, v in measured.items()}
        out.append(Candidate(batch, per_step, pred["steps"], pred["images"], time, rel))
    return out


def ranking(cands: list[Candidate]) -> str | None:
    """Whether the predicted wall time orders the candidates as the measured time to SHARE of the best does."""
    both = [(c.time, c.measured["time"], c.batch) for c in cands if c.time is not None and c.measured["time"]]
    if len(both) < 2 or len(both) < len(cands):
        return None
    pred = [b for _, _, b in sorted(both, key=lambda x: x[0])]
    meas = [b for _, _, b in sorted(both, key=lambda x: x[1])]
    order = " < ".join(f"batch {b}" for b in meas)
    if pred == meas:
        return f"The predicted wall time ranks the batch sizes as measured ({order})."
    return (f"The predicted wall time ranks the batch sizes differently ({' < '.join(f'batch {b}' for b in pred)}) "
            f"from the measured one ({order}).")


def _span(v: tuple) -> str:
    value, low, high = v
    return f"{value:.2f}x" if abs(high - low) < 0.005 else f"{value:.2f}x ({low:.2f}–{high:.2f})"


def _rel(v) -> str:
    return "never" if v is None else f"{v:.2f}x"


HEAD = ["batch", "images per step", "predicted steps", "predicted images", "predicted wall time",
        f"measured steps to {int(SHARE * 100)}% of best", "measured images", "measured wall time"]


def table(cands: list[Candidate]) -> list[list[str]]:
    """The report's rows, HEAD's columns: every figure relative to the smallest candidate."""
    return [[str(c.batch), f"{c.per_step:.0f}", _span(c.steps), _span(c.images),
             "–" if c.time is None else f"{c.time:.2f}x", _rel(c.measured["steps"]), _rel(c.measured["images"]),
             _rel(c.measured["time"])] for c in cands]
