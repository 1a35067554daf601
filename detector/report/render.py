"""The comparison report: report.html (self-contained), report.md and PNG plots from run folders alone.

`compare(run_dirs, out_dir)` is what `detector compare` and `detector sweep`
call. It reads the runs (detector.runs), works out what they say
(detector.analysis), draws (detector.plots) and writes. The HTML embeds its
images as base64 and loads nothing from anywhere, so it can be mailed or opened
offline.
"""

from __future__ import annotations

import base64
import html
import os
from dataclasses import dataclass, field
from pathlib import Path

from detector.report import analysis
from detector.report import plots
from detector.report import recommend, timing
from detector.record import reader as runs
from detector.errors import RunDirError
from detector.record.writer import now_iso

REPORT_HTML, REPORT_MD, PLOTS_DIR = "report.html", "report.md", "plots"


def _num(v, fmt="{:.3g}"):
    return "–" if v is None else fmt.format(v)


# (row label, summary key or callable, formatter): the per-run table, runs as columns.
TABLE = [
    ("status", "status", str),
    ("seed", "seed", str),
    ("batch requested", "batch_requested", str),
    ("batch used", "batch_used", str),
    ("nbs (nominal batch)", "nbs", str),
    ("accumulate (iterations per step)", "accumulate", str),
    ("images per optimizer step", "images_per_step", str),
    ("optimizer", "optimizer", str),
    ("lr0", "lr0", lambda v: _num(v, "{:.4g}")),
    ("lr0 rule", "lr_rule", str),
    ("epochs (done / planned)", lambda r: f"{r['epochs_done']} / {r['epochs_planned'] or '?'}", str),
    ("iterations per epoch", "iterations_per_epoch", str),
    ("optimizer steps per epoch (last epoch)", "steps_per_epoch", str),
    ("optimizer steps in total", "optimizer_steps", str),
    ("images/s (median epoch)", "images_per_s", lambda v: _num(v, "{:.1f}")),
    ("epoch time, s (median, incl. validation)", "epoch_time_s", lambda v: _num(v, "{:.1f}")),
    ("training time, s (all epochs)", "train_time_s", lambda v: _num(v, "{:.0f}")),
    ("peak GPU memory, GiB", lambda r: "n/a (CPU)" if r["peak_gpu_mem_gb"] is None and r["epochs_done"]
     else r["peak_gpu_mem_gb"], lambda v: v if isinstance(v, str) else f"{v:.2f}"),
    ("best mAP50-95 (epoch)", lambda r: None if r["best_map50_95"] is None
     else f"{r['best_map50_95']:.3f} ({r['best_epoch']})", str),
    ("final mAP50 (last epoch)", "final_map50", lambda v: _num(v, "{:.3f}")),
    ("final mAP50-95 (last epoch)", "final_map50_95", lambda v: _num(v, "{:.3f}")),
    ("final train loss (epoch mean)", "final_train_loss", lambda v: _num(v, "{:.3f}")),
    ("final val loss", "final_val_loss", lambda v: _num(v, "{:.3f}")),
]

GLOSSARY = (
    "An iteration is one batch through the model (forward and backward). An optimizer step is one update of the "
    "weights. Ultralytics adds up gradients over accumulate = round(nbs / batch) iterations before each step "
    "(nbs, the nominal batch size, is 64 unless changed), so with the defaults batch 16, 32 and 64 all update "
    "the weights once per 64 images. mAP50 and mAP50-95 are Ultralytics' validation mean average precision at "
    "IoU 0.5 and averaged over IoU 0.5 to 0.95 (higher is better)."
)


@dataclass
class Comparison:
    """Everything the report says, before it is written as HTML or Markdown."""

    runs: list
    rows: list[dict]
    kind: analysis.Kind
    warnings: list[str]
    notes: list[str]
    run_notes: dict[str, list[str]]
    stats: dict[str, list[analysis.GroupStat]] = field(default_factory=dict)
    verdicts: list[str] = field(default_factory=list)
    figures: list[tuple[Path, str]] = field(default_factory=list)  # (png, caption)
    recommendation: recommend.Recommendation | None = None
    time_to_accuracy: tuple[list[str], list[list[str]]] = ([], [])  # (header, rows)

    def cell(self, row: dict, key, fmt) -> str:
        value = key(row) if callable(key) else row.get(key)
        return "–" if value is None else fmt(value)


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
    for metric, label in (("best_map50_95", "Best mAP50-95"), ("final_map50_95", "Final mAP50-95")):
        comp.stats[label] = analysis.group_stats(rows, metric)
    groups = comp.stats["Best mAP50-95"]
    if len(groups) > 1 and all(s.n == 1 for s in groups):
        comp.verdicts.append(analysis.SINGLE_SEED)
    else:
        comp.verdicts += [v for label, stats in comp.stats.items() if (v := analysis.noise_verdict(stats, label))]
        for metric, label in (("best_map50_95", "Best mAP50-95"), ("final_map50_95", "Final mAP50-95")):
            comp.verdicts += analysis.paired_verdicts(rows, metric, label)
    return comp


def _draw(comp: Comparison, plot_dir: Path) -> None:
    rs = comp.runs
    shared, train_terms, val_terms = analysis.shared_loss_terms(rs)
    figs = [
        (plots.loss_curve(rs, "iteration", "iteration", plot_dir / "loss_vs_iteration.png"),
         "Per iteration. Larger batches make fewer iterations per epoch, so their curves are shorter here."),
        (plots.loss_curve(rs, "images_seen", "images seen", plot_dir / "loss_vs_images.png"),
         "The same losses against images seen: the fair x-axis for the same amount of data."),
        (plots.loss_curve(rs, "time_s", "wall time (s)", plot_dir / "loss_vs_time.png"),
         "Against wall-clock training time: what a given budget of time buys."),
        (plots.loss_terms(rs, shared, plot_dir / "loss_terms.png"),
         "Each loss term every run records, smoothed, against images seen."),
        (plots.epoch_metrics(rs, "epoch", plot_dir / "map_vs_epoch.png"),
         "Validation mAP after each epoch."),
        (plots.epoch_metrics(rs, "time", plot_dir / "map_vs_time.png"),
         "Validation mAP against wall time (training plus validation)."),
        (plots.epoch_losses(rs, train_terms, val_terms, plot_dir / "loss_per_epoch.png"),
         "Mean training loss and validation loss per epoch; a falling training loss with a rising validation "
         "loss means over-fitting."),
        (plots.speed_memory(comp.rows, rs, plot_dir / "speed_memory.png"),
         "Throughput and peak GPU memory per run."),
        (plots.noise_scale(rs, comp.rows, plot_dir / "noise_scale.png"),
         "The gradient noise scale B_simple measured in each epoch. Well below it, more images per step buy "
         "nearly proportionally fewer steps; well above it, extra images per step are mostly wasted."),
    ]
    comp.figures = [(p, c) for p, c in figs if p is not None]


def default_out(run_dirs) -> Path:
    """Where a report goes when --out is not given: a sweep folder itself, else the folder holding the runs."""
    dirs = [Path(p).expanduser().resolve() for p in run_dirs]
    if len(dirs) == 1 and dirs[0].is_dir() and not (dirs[0] / runs.RUN_JSON).exists():
        return dirs[0]
    common = Path(os.path.commonpath([d.parent for d in dirs]))
    if common == Path(common.anchor) or common == Path.home().resolve():  # runs in unrelated folders
        return Path.cwd() / "compare"
    return common


def compare(run_dirs, out_dir: str | Path) -> Path:
    """Write report.html, report.md and plots/*.png comparing run_dirs into out_dir; return report.html."""
    comp = analyse(load_runs(run_dirs))
    out = Path(out_dir).expanduser().resolve()
    plot_dir = out / PLOTS_DIR
    try:
        plot_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise RunDirError(f"cannot create report folder {out}: {e.strerror}; pass a writable --out") from e
    _draw(comp, plot_dir)
    (out / REPORT_MD).write_text(markdown(comp, out), encoding="utf-8")
    (out / REPORT_HTML).write_text(to_html(comp), encoding="utf-8")
    return out / REPORT_HTML


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


def _stats_rows(comp: Comparison) -> list[list[str]]:
    out = []
    for label, stats in comp.stats.items():
        for s in stats:
            ci = "–" if s.half_width is None else f"{s.mean:.3f} ± {s.half_width:.3f} ({s.low:.3f} to {s.high:.3f})"
            out.append([label, str(s.batch), str(s.n), f"{s.mean:.3f}", ci])
    return out


STATS_HEAD = ["metric", "batch", "runs (seeds)", "mean", "95% interval (t)"]


def markdown(comp: Comparison, out: Path) -> str:
    """The report as Markdown, with the plots linked as files beside it."""
    names = [r["run"] for r in comp.rows]
    lines = ["# Batch-size comparison", "", f"Generated {now_iso()} from {len(comp.runs)} run folder(s).", ""]
    lines += _recommendation_md(comp)
    lines += [f"- {s}" for s in headline(comp)] + ["", "## What kind of comparison", "", comp.kind.text, ""]
    if comp.warnings:
        lines += ["## Warning: the runs differ in more than batch size", ""] + [f"- {w}" for w in comp.warnings] + [""]
    if comp.notes:
        lines += ["## Notes", ""] + [f"- {n}" for n in comp.notes] + [""]
    if comp.run_notes:
        lines += ["## Runs that are not complete", ""]
        lines += [f"- **{n}**: {'; '.join(v)}" for n, v in comp.run_notes.items()] + [""]
    lines += ["## Runs", "", "| | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for label, key, fmt in TABLE:
        lines.append(f"| {label} | " + " | ".join(comp.cell(r, key, fmt) for r in comp.rows) + " |")
    lines += [""]
    if any(s.n > 1 for stats in comp.stats.values() for s in stats):
        lines += ["## Seeds: mean and 95% confidence interval", "", "| " + " | ".join(STATS_HEAD) + " |",
                  "|---" * len(STATS_HEAD) + "|"]
        lines += ["| " + " | ".join(row) + " |" for row in _stats_rows(comp)] + [""]
    lines += [f"**{v}**" + "\n" for v in comp.verdicts]
    head, body = comp.time_to_accuracy
    if body:
        lines += ["## Time to accuracy", "", TTA_NOTE, "", "| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
        lines += ["| " + " | ".join(row) + " |" for row in body] + [""]
    lines += ["## Plots", ""]
    for png, caption in comp.figures:
        lines += [f"![{png.stem}]({png.relative_to(out).as_posix()})", "", caption, ""]
    lines += ["## Terms", "", GLOSSARY, "", "## Run folders", ""] + [f"- `{r.path}`" for r in comp.runs]
    return "\n".join(lines) + "\n"


TTA_NOTE = ("When each run first reached 50% and 90% of the best mAP50-95 of any compared run: wall time "
            "(training and validation), images seen and optimizer steps at the end of that epoch.")


def _recommendation_md(comp: Comparison) -> list[str]:
    rec = comp.recommendation
    if rec is None:
        return []
    out = ["## Recommendation", "", f"**{rec.verdict}**", ""] + [f"- {s}" for s in rec.evidence] + [""]
    if rec.command:
        out += ["To settle it:", "", "```", rec.command, "```", ""]
    return out


def _recommendation_html(comp: Comparison) -> list[str]:
    e, rec = html.escape, comp.recommendation
    if rec is None:
        return []
    out = ["<h2>Recommendation</h2>", f'<p class="verdict" id="recommendation">{e(rec.verdict)}</p>',
           "<ul>" + "".join(f"<li>{e(s)}</li>" for s in rec.evidence) + "</ul>"]
    if rec.command:
        out.append(f"<p>To settle it:</p><pre><code>{e(rec.command)}</code></pre>")
    return out


CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,"DejaVu Sans",sans-serif;margin:2rem auto;max-width:1180px;
color:#1d232a;padding:0 1rem;line-height:1.45}
h1{margin-bottom:.2rem}h2{margin-top:2rem;border-bottom:1px solid #dde;padding-bottom:.2rem}
.meta{color:#667}.kind{background:#eef5ff;border-left:4px solid #3a7bd5;padding:.6rem 1rem}
.warn{background:#fff6e0;border-left:4px solid #e0a000;padding:.6rem 1rem}
.note{background:#f4f4f6;border-left:4px solid #99a;padding:.6rem 1rem}
.verdict{font-weight:600}
table{border-collapse:collapse;font-size:.9rem;margin:.5rem 0}th,td{border:1px solid #ccd;padding:.25rem .55rem;
text-align:right}th{background:#f0f2f5}td:first-child,th:first-child{text-align:left}
tbody tr:nth-child(even){background:#fafbfc}td:first-child{white-space:nowrap}.scroll{overflow-x:auto}
figure{margin:1.2rem 0}figure img{max-width:100%;border:1px solid #e3e5e8}figcaption{color:#445;font-size:.9rem}
code{font-size:.85rem}
"""


def _ul(items, cls) -> str:
    return f'<div class="{cls}"><ul>' + "".join(f"<li>{html.escape(i)}</li>" for i in items) + "</ul></div>"


def _img(png: Path) -> str:
    data = base64.b64encode(png.read_bytes()).decode("ascii")
    return f'<img alt="{html.escape(png.stem)}" src="data:image/png;base64,{data}">'


def to_html(comp: Comparison) -> str:
    """The report as one HTML file: inline CSS, plots embedded, no external resources."""
    e = html.escape
    names = [r["run"] for r in comp.rows]
    parts = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
             "<title>Batch-size comparison</title>", f"<style>{CSS}</style></head><body>",
             "<h1>Batch-size comparison</h1>",
             f'<p class="meta">Generated {e(now_iso())} from {len(comp.runs)} run folder(s).</p>',
             *_recommendation_html(comp),
             "<ul>" + "".join(f"<li>{e(s)}</li>" for s in headline(comp)) + "</ul>",
             "<h2>What kind of comparison</h2>", f'<p class="kind">{e(comp.kind.text)}</p>']
    if comp.warnings:
        parts += ["<h2>Warning: the runs differ in more than batch size</h2>", _ul(comp.warnings, "warn")]
    if comp.notes:
        parts += ["<h2>Notes</h2>", _ul(comp.notes, "note")]
    if comp.run_notes:
        parts += ["<h2>Runs that are not complete</h2>",
                  _ul([f"{n}: {'; '.join(v)}" for n, v in comp.run_notes.items()], "warn")]
    head = "".join(f"<th>{e(n)}</th>" for n in names)
    body = "".join(f"<tr><td>{e(label)}</td>" + "".join(f"<td>{e(comp.cell(r, key, fmt))}</td>" for r in comp.rows)
                   + "</tr>" for label, key, fmt in TABLE)
    parts += ["<h2>Runs</h2>", f'<div class="scroll"><table id="runs"><thead><tr><th></th>{head}</tr></thead>'
              f"<tbody>{body}</tbody></table></div>"]
    if any(s.n > 1 for stats in comp.stats.values() for s in stats):
        srows = "".join("<tr>" + "".join(f"<td>{e(c)}</td>" for c in row) + "</tr>" for row in _stats_rows(comp))
        parts += ["<h2>Seeds: mean and 95% confidence interval</h2>",
                  "<table><thead><tr>" + "".join(f"<th>{e(h)}</th>" for h in STATS_HEAD) + "</tr></thead>"
                  f"<tbody>{srows}</tbody></table>"]
    parts += [f'<p class="verdict">{e(v)}</p>' for v in comp.verdicts]
    head, body = comp.time_to_accuracy
    if body:
        parts += ["<h2>Time to accuracy</h2>", f"<p>{e(TTA_NOTE)}</p>", "<table><thead><tr>"
                  + "".join(f"<th>{e(h)}</th>" for h in head) + "</tr></thead><tbody>"
                  + "".join("<tr>" + "".join(f"<td>{e(c)}</td>" for c in row) + "</tr>" for row in body)
                  + "</tbody></table>"]
    parts += ["<h2>Plots</h2>"]
    parts += [f"<figure>{_img(png)}<figcaption>{e(caption)}</figcaption></figure>" for png, caption in comp.figures]
    parts += ["<h2>Terms</h2>", f"<p>{e(GLOSSARY)}</p>", "<h2>Run folders</h2>",
              "<ul>" + "".join(f"<li><code>{e(str(r.path))}</code></li>" for r in comp.runs) + "</ul>",
              "</body></html>"]
    return "\n".join(parts) + "\n"
