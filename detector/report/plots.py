"""The comparison's figures as PNG files (matplotlib, Agg backend: no display, no network).

Each function draws one figure for a list of runs and returns the file it wrote;
`draw` writes all of the report's figures. Runs of the same batch size share a
colour; seeds differ in line style. The captions are the report's text
(report.sections).
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; must precede pyplot
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from detector import fileio  # noqa: E402
from detector.report.analysis import batch_used, shared_loss_terms  # noqa: E402
from detector.record.runs import Run, ema, smoothing_weight  # noqa: E402

_STYLES = ("-", "--", ":", "-.")
DPI = 110


def styles(runs: list[Run]) -> dict[str, dict]:
    """Line colour per batch size and line style per seed within it, keyed by run name."""
    batches = sorted({batch_used(r) or 0 for r in runs})
    cmap = plt.get_cmap("tab10")
    out, seen = {}, {}
    for r in runs:
        b = batch_used(r) or 0
        k = seen.get(b, 0)
        seen[b] = k + 1
        out[r.name] = {"color": cmap(batches.index(b) % 10), "linestyle": _STYLES[k % len(_STYLES)]}
    return out


def label(run: Run) -> str:
    """Legend text: the run's name, plus its state when it did not complete."""
    return run.name if run.finished else f"{run.name} ({run.status})"


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    try:
        fileio.save_figure(fig, path, dpi=DPI)  # drawn in memory, then written atomically
    finally:
        plt.close(fig)
    return path


def _empty_note(ax, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="0.4", wrap=True)


def loss_curve(runs: list[Run], x: str, xlabel: str, path: Path) -> Path:
    """Training loss per iteration against column x: raw (faint) and EMA-smoothed (solid)."""
    fig, ax = plt.subplots(figsize=(10, 4.2))
    st, tops = styles(runs), []
    for r in runs:
        xs, ys = r.iterations.get(x), r.iterations.get("loss")
        if xs is None or ys is None or not len(ys):
            continue
        ax.plot(xs, ys, color=st[r.name]["color"], alpha=0.18, linewidth=0.8)
        ax.plot(xs, ema(ys, smoothing_weight(len(ys))), label=label(r), linewidth=1.8, **st[r.name])
        tops.append(np.nanpercentile(ys, 98))
    if tops:
        ax.set_ylim(0, max(tops) * 1.1)  # a few huge first-iteration losses would flatten everything else
        ax.legend(fontsize=8, ncol=2)
    else:
        _empty_note(ax, "no training iterations recorded yet")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("training loss (sum of terms)")
    ax.set_title(f"Training loss per iteration against {xlabel} (faint: raw; solid: smoothed)")
    ax.grid(alpha=0.3)
    return _save(fig, path)


def loss_terms(runs: list[Run], terms: list[str], path: Path) -> Path | None:
    """Each shared loss term, smoothed, against images seen (one panel per term)."""
    if not terms:
        return None
    fig, axes = plt.subplots(1, len(terms), figsize=(4 * len(terms), 3.6), squeeze=False)
    st = styles(runs)
    for ax, term in zip(axes[0], terms):
        for r in runs:
            xs, ys = r.iterations.get("images_seen"), r.iterations.get(term)
            if xs is not None and ys is not None and len(ys):
                ax.plot(xs, ema(ys, smoothing_weight(len(ys))), label=label(r), **st[r.name])
        ax.set_title(f"{term} (smoothed)")
        ax.set_xlabel("images seen")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    return _save(fig, path)


def epoch_metrics(runs: list[Run], x: str, path: Path) -> Path:
    """mAP50 and mAP50-95 per epoch against the epoch (x='epoch') or wall time (x='time')."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    st = styles(runs)
    any_rows = False
    for ax, metric, title in zip(axes, ("map50", "map50_95"), ("mAP50", "mAP50-95")):
        for r in runs:
            ys = r.epochs.get(metric)
            if ys is None or not len(ys):
                continue
            any_rows = True
            xs = r.epochs.get("epoch") if x == "epoch" else np.nancumsum(r.epochs.get("epoch_time_s"))
            ax.plot(xs, ys, marker="o", markersize=3, label=label(r), **st[r.name])
        ax.set_title(f"{title} per epoch against {'epoch' if x == 'epoch' else 'wall time'}")
        ax.set_xlabel("epoch" if x == "epoch" else "wall time at the end of the epoch (s)")
        if x == "epoch":
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(title)
        ax.grid(alpha=0.3)
        if not any_rows:
            _empty_note(ax, "no completed epoch yet")
    if any_rows:
        axes[0].legend(fontsize=8)
    return _save(fig, path)


def epoch_losses(runs: list[Run], train_terms: list[str], val_terms: list[str], path: Path) -> Path:
    """Mean training loss and validation loss per epoch (sums of the terms every run shares)."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    st = styles(runs)
    for ax, terms, title in zip(axes, (train_terms, val_terms), ("training loss (epoch mean)", "validation loss")):
        drawn = False
        for r in runs:
            cols = [r.epochs.get(t) for t in terms]
            if not terms or any(c is None for c in cols) or not len(r.epochs):
                continue
            ax.plot(r.epochs.get("epoch"), np.sum(cols, axis=0), marker="o", markersize=3, label=label(r),
                    **st[r.name])
            drawn = True
        ax.set_title(f"{title} per epoch")
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel("loss (" + " + ".join(t.split("_")[1] for t in terms) + ")" if terms else "")
        ax.grid(alpha=0.3)
        if drawn:
            ax.legend(fontsize=8)
        else:
            _empty_note(ax, "no completed epoch yet" if terms else "the runs share no loss columns")
    return _save(fig, path)


def speed_memory(rows: list[dict], runs: list[Run], path: Path) -> Path:
    """Bars: median images per second and peak GPU memory per run."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    st = styles(runs)
    names = [r["run"] for r in rows]
    colors = [st[n]["color"] for n in names]
    for ax, key, title in zip(axes, ("images_per_s", "peak_gpu_mem_gb"),
                              ("training throughput (images/s, median epoch)", "peak GPU memory (GiB)")):
        vals = [r[key] for r in rows]
        if all(v is None for v in vals):
            _empty_note(ax, "not recorded (CPU runs have no GPU memory)" if "mem" in key else "no completed epoch yet")
            ax.set_xticks([])
        else:
            bars = ax.bar(range(len(names)), [v or 0 for v in vals], color=colors)
            ax.bar_label(bars, labels=["n/a" if v is None else f"{v:.3g}" for v in vals], fontsize=8)
            ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=8)
        ax.set_title(title)
        ax.grid(alpha=0.3, axis="y")
    return _save(fig, path)


def noise_scale(runs: list[Run], rows: list[dict], path: Path) -> Path | None:
    """B_simple per epoch per run (log scale) with its 90% band, and each run's images per optimizer step as a line."""
    have = [r for r in runs if (c := r.epochs.get("grad_noise_scale")) is not None and np.any(c > 0)]
    if not have:
        return None  # runs recorded before the measure existed, or with --no-grad-stats
    fig, ax = plt.subplots(figsize=(10, 4.2))
    st = styles(runs)
    finite = [v for r in have for k in ("grad_noise_scale", "grad_noise_scale_high")
              if (c := r.epochs.get(k)) is not None for v in c[np.isfinite(c) & (c > 0)]]
    steps = [v for row in rows if (v := row.get("images_per_step") or row.get("batch_used"))]
    top = 3 * max(finite + steps)  # where an unbounded band ends: above every finite value and step line
    for r in have:
        ys, ep = r.epochs.get("grad_noise_scale"), r.epochs.get("epoch")
        ok = ys > 0  # a non-positive |G|² estimate has no ratio; NaN compares False too
        ax.plot(ep[ok], ys[ok], marker="o", markersize=3, label=label(r), **st[r.name])
        low, high = r.epochs.get("grad_noise_scale_low"), r.epochs.get("grad_noise_scale_high")
        if low is not None and high is not None:  # runs recorded before the interval existed have no band
            band = ~np.isnan(low)
            ax.fill_between(ep[band], np.maximum(low[band], top / 1e6), np.where(np.isnan(high[band]), top,
                            high[band]), color=st[r.name]["color"], alpha=0.12, linewidth=0)
    seen = set()
    for row in rows:
        step = row.get("images_per_step") or row.get("batch_used")
        if step and step not in seen:
            seen.add(step)
            color = st[row["run"]]["color"] if row["run"] in st else "0.3"
            ax.axhline(step, color=color, linewidth=1, alpha=0.6, linestyle=(0, (6, 3)))
            ax.annotate(f"{step} images/step", (1, step), xycoords=("axes fraction", "data"), ha="right",
                        va="bottom", fontsize=8, color=color)
    ax.set_yscale("log")
    ax.set_ylim(top=top)
    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("B_simple = tr(Σ) / |G|²")
    ax.set_title("Gradient noise scale per epoch, 90% interval shaded (top edge: unbounded); dashed: images per step")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    return _save(fig, path)


def draw(runs: list[Run], rows: list[dict], plot_dir: Path) -> list[Path]:
    """Every figure of the report into plot_dir, in report order; a figure with nothing to show is left out."""
    shared, train_terms, val_terms = shared_loss_terms(runs)
    drawn = [
        loss_curve(runs, "iteration", "iteration", plot_dir / "loss_vs_iteration.png"),
        loss_curve(runs, "images_seen", "images seen", plot_dir / "loss_vs_images.png"),
        loss_curve(runs, "time_s", "wall time (s)", plot_dir / "loss_vs_time.png"),
        loss_terms(runs, shared, plot_dir / "loss_terms.png"),
        epoch_metrics(runs, "epoch", plot_dir / "map_vs_epoch.png"),
        epoch_metrics(runs, "time", plot_dir / "map_vs_time.png"),
        epoch_losses(runs, train_terms, val_terms, plot_dir / "loss_per_epoch.png"),
        speed_memory(rows, runs, plot_dir / "speed_memory.png"),
        noise_scale(runs, rows, plot_dir / "noise_scale.png"),
    ]
    return [p for p in drawn if p is not None]
