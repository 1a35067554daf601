"""What a set of runs says, gathered once: the Comparison that report.sections turns into the report.

`load_runs` reads run folders (detector.record.runs); `analyse` works out the
per-run figures, the kind of comparison, warnings and notes, seed statistics and
verdicts (report.analysis), time to accuracy (report.timing) and the
recommendation (report.recommend). Nothing here draws or writes files.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from detector.errors import RunDirError
from detector.record import runs
from detector.report import analysis, prediction, recommend, timing

METRICS = (("best_map50_95", "Best mAP50-95"), ("final_map50_95", "Final mAP50-95"))  # the seed statistics


@dataclass
class Comparison:
    """Everything the report says, before it becomes sections."""

    runs: list
    rows: list[dict]
    kind: analysis.Kind
    warnings: list[str]
    notes: list[str]
    run_notes: dict[str, list[str]]
    stats: dict[str, list[analysis.GroupStat]] = field(default_factory=dict)
    verdicts: list[str] = field(default_factory=list)
    figures: list[Path] = field(default_factory=list)  # the PNG files drawn for it, in report order
    recommendation: recommend.Recommendation | None = None
    time_to_accuracy: tuple[list[str], list[list[str]]] = ([], [])  # (header, rows)
    noise: prediction.NoiseScale | None = None  # the pooled late noise scale
    predicted: list[prediction.Candidate] = field(default_factory=list)  # per batch: predicted against measured

    @property
    def has_seed_spread(self) -> bool:
        """Whether some batch size has more than one run, so a seed interval exists."""
        return any(s.n > 1 for stats in self.stats.values() for s in stats)


def load_runs(run_dirs) -> list:
    """Read every run folder (a sweep folder stands for its runs); names made unique for the legend."""
    dirs = runs.find(run_dirs)
    if not dirs:
        raise RunDirError("no run folders given; pass folders written by 'detector train' or 'detector sweep'")
    loaded = [runs.load(d) for d in dirs]
    names = [r.name for r in loaded]
    for r in loaded:
        if names.count(r.name) > 1:
            r.meta = {**r.meta, "name": f"{r.path.parent.name}/{r.path.name}"}
    return loaded


def analyse(loaded: list) -> Comparison:
    """Work out the table, the kind of comparison, the warnings and the seed statistics."""
    shared, train_terms, val_terms = analysis.shared_loss_terms(loaded)
    rows = [analysis.summary(r, train_terms, val_terms) if len(loaded) > 1 else analysis.summary(r) for r in loaded]
    kind = analysis.comparison_kind(rows)
    warnings, notes = analysis.differences(loaded, rows, kind) if len(loaded) > 1 else ([], [])
    _, only = analysis.shared_columns(loaded, "loss_terms")
    if only:
        detail = "; ".join(f"{n} also has {', '.join(c)}" for n, c in only.items())
        common = ", ".join(shared) if shared else "none besides the total"
        notes.append(f"The runs record different loss terms ({detail}). Plots and totals compare what they share: "
                     f"{common}.")
    comp = Comparison(loaded, rows, kind, warnings, notes, {r.name: r.notes for r in loaded if r.notes})
    comp.recommendation = recommend.recommend(loaded, rows, kind, warnings)
    comp.time_to_accuracy = timing.rows(loaded)
    comp.noise = prediction.pooled(loaded)
    if comp.noise is not None and kind.name != "accumulate" and len({r["batch_used"] for r in rows}) > 1:
        comp.predicted = prediction.candidates(loaded, rows, comp.noise)
    for metric, label in METRICS:
        comp.stats[label] = analysis.group_stats(rows, metric)
    groups = comp.stats["Best mAP50-95"]
    if len(groups) > 1 and all(s.n == 1 for s in groups):
        comp.verdicts.append(analysis.SINGLE_SEED)
    else:
        comp.verdicts += [v for label, stats in comp.stats.items() if (v := analysis.noise_verdict(stats, label))]
        for metric, label in METRICS:
            comp.verdicts += analysis.paired_verdicts(rows, metric, label)
    return comp


def _groups(rows: list[dict]) -> list[tuple[str, list[dict]]]:
    """Rows grouped by batch size when seeds repeat a batch, else one group per run (labelled by name)."""
    batches = {r["batch_used"] for r in rows}
    if len(batches) < 2 or len(batches) == len(rows):
        return [(r["run"], [r]) for r in rows]
    by: dict = {}
    for r in rows:
        by.setdefault(r["batch_used"], []).append(r)
    return [(f"batch {b}", g) for b, g in sorted(by.items(), key=lambda kv: kv[0] or 0)]


def _mean(group: list[dict], key: str):
    vals = [r[key] for r in group if r[key] is not None]
    return sum(vals) / len(vals) if vals else None


def headline(comp: Comparison) -> list[str]:
    """The few sentences a reader wants first: speed, time and mAP per batch size (means over seeds)."""
    rows, out = comp.rows, []
    groups = [(label, g, {k: _mean(g, k) for k in ("images_per_s", "train_time_s", "final_map50_95")})
              for label, g in _groups(rows)]
    mean = " (means over seeds)" if any(len(g) > 1 for _, g, _ in groups) else ""
    speed = [(label, m["images_per_s"]) for label, _, m in groups if m["images_per_s"]]
    if len(speed) > 1:
        (fast, f), (slow, sl) = max(speed, key=lambda x: x[1]), min(speed, key=lambda x: x[1])
        out.append(f"Fastest{mean}: {fast} at {f:.1f} images/s, {f / sl:.2f}x the slowest ({slow}, "
                   f"{sl:.1f} images/s).")
    done = [(label, m) for label, _, m in groups if m["final_map50_95"] is not None]
    if len(done) > 1:
        out.append(f"Training time and final mAP50-95{mean}: " + "; ".join(
            f"{label}: {m['train_time_s'] / 60:.1f} min, {m['final_map50_95']:.3f}" for label, m in done) + ".")
    best = [r for r in rows if r["best_map50_95"] is not None]
    if best:
        top = max(best, key=lambda r: r["best_map50_95"])
        out.append(f"Highest best mAP50-95 of a single run: {top['run']} with {top['best_map50_95']:.3f} at epoch "
                   f"{top['best_epoch']}.")
    total = sum(r["train_time_s"] or 0 for r in rows)
    out.append(f"{len(rows)} run(s), {total / 60:.1f} min of training in all.")
    return out
