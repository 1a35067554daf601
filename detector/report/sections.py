"""The report's content, in order: a Comparison turned into sections of blocks (report.document).

The order of the sections is written once, in ORDER; report.emit prints the same
list as Markdown and as HTML, so a new section is one function added here.
"""

from __future__ import annotations

from detector.record.writer import now_iso
from detector.report.comparison import Comparison, headline
from detector.report import prediction
from detector.report.document import BulletList, Code, Image, Paragraph, Section, Table

TITLE = "Batch-size comparison"


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

STATS_HEAD = ["metric", "batch", "runs (seeds)", "mean", "95% interval (t)"]

GLOSSARY = (
    "An iteration is one batch through the model (forward and backward). An optimizer step is one update of the "
    "weights. Ultralytics adds up gradients over accumulate = round(nbs / batch) iterations before each step "
    "(nbs, the nominal batch size, is 64 unless changed), so with the defaults batch 16, 32 and 64 all update "
    "the weights once per 64 images. mAP50 and mAP50-95 are Ultralytics' validation mean average precision at "
    "IoU 0.5 and averaged over IoU 0.5 to 0.95 (higher is better)."
)

TTA_NOTE = ("When each run first reached 50% and 90% of the best mAP50-95 of any compared run: wall time "
            "(training and validation), images seen and optimizer steps at the end of that epoch.")

# Per plot file (report.plots.draw names them): what the figure shows.
CAPTIONS = {
    "loss_vs_iteration": "Per iteration. Larger batches make fewer iterations per epoch, so their curves are shorter "
                         "here.",
    "loss_vs_images": "The same losses against images seen: the fair x-axis for the same amount of data.",
    "loss_vs_time": "Against wall-clock training time: what a given budget of time buys.",
    "loss_terms": "Each loss term every run records, smoothed, against images seen.",
    "map_vs_epoch": "Validation mAP after each epoch.",
    "map_vs_time": "Validation mAP against wall time (training plus validation).",
    "loss_per_epoch": "Mean training loss and validation loss per epoch; a falling training loss with a rising "
                      "validation loss means over-fitting.",
    "speed_memory": "Throughput and peak GPU memory per run.",
    "noise_scale": "The gradient noise scale B_simple measured in each epoch, with its 90% interval as a band (a band "
                   "reaching the top edge is unbounded: unresolved). Well below it, more images per step buy nearly "
                   "proportionally fewer steps; well above it, extra images per step are mostly wasted.",
}


def _cell(row: dict, key, fmt) -> str:
    value = key(row) if callable(key) else row.get(key)
    return "–" if value is None else fmt(value)


def _title(comp: Comparison) -> Section:
    blocks = [Paragraph(f"Generated {now_iso()} from {len(comp.runs)} run folder(s).", "muted")]
    if comp.recommendation is None:  # the headline then opens the report
        blocks.append(BulletList(headline(comp)))
    return Section(TITLE, "", blocks, level=1)


def _recommendation(comp: Comparison) -> Section | None:
    rec = comp.recommendation
    if rec is None:
        return None
    blocks = [Paragraph(rec.verdict, "strong"), BulletList(rec.evidence)]
    if rec.command:
        blocks += [Paragraph("To settle it:"), Code(rec.command)]
    return Section("Recommendation", "recommendation", blocks + [BulletList(headline(comp))])


def _kind(comp: Comparison) -> Section:
    return Section("What kind of comparison", "kind", [Paragraph(comp.kind.text, "info")])


def _warnings(comp: Comparison) -> Section | None:
    if not comp.warnings:
        return None
    return Section("Warning: the runs differ in more than batch size", "warnings", [BulletList(comp.warnings, "warn")])


def _notes(comp: Comparison) -> Section | None:
    return Section("Notes", "notes", [BulletList(comp.notes, "note")]) if comp.notes else None


def _incomplete(comp: Comparison) -> Section | None:
    if not comp.run_notes:
        return None
    items = [f"**{n}**: {'; '.join(v)}" for n, v in comp.run_notes.items()]
    return Section("Runs that are not complete", "incomplete", [BulletList(items, "warn")])


def _verdicts(comp: Comparison) -> list[Paragraph]:
    return [Paragraph(v, "strong") for v in comp.verdicts]


def _runs(comp: Comparison) -> Section:
    table = Table(["", *(r["run"] for r in comp.rows)],
                  [[label, *(_cell(r, key, fmt) for r in comp.rows)] for label, key, fmt in TABLE], anchor="runs")
    # The seed verdicts follow the seed table; without one (one run per batch size) they follow this table.
    wait = _data_wait(comp)
    return Section("Runs", "per-run", [table] + ([wait] if wait else [])
                   + ([] if comp.has_seed_spread else _verdicts(comp)))


def _data_wait(comp: Comparison) -> Paragraph | None:
    """Each run's step time with its wait for data beside it (iterations.csv): a starving GPU shows here."""
    import numpy as np

    parts = []
    for run in comp.runs:
        it, wait = run.iterations.get("iter_time_s"), run.iterations.get("data_time_s")
        if it is None or wait is None or not len(it) or not np.nansum(it):
            continue
        parts.append(f"{run.name} {np.nanmedian(it - wait):.3f} s step + {np.nanmedian(wait):.3f} s waiting for "
                     f"the next batch ({100 * np.nansum(wait) / np.nansum(it):.0f}% of iteration time)")
    if not parts:
        return None
    return Paragraph("Median iteration, as step and wait for data: " + "; ".join(parts) + ". A wait of more than a "
                     "few percent means the data loader, not the model, sets the pace (more --workers, if cores "
                     "are free).")


def _seeds(comp: Comparison) -> Section | None:
    if not comp.has_seed_spread:
        return None
    rows = []
    for label, stats in comp.stats.items():
        for s in stats:
            ci = "–" if s.half_width is None else f"{s.mean:.3f} ± {s.half_width:.3f} ({s.low:.3f} to {s.high:.3f})"
            rows.append([label, str(s.batch), str(s.n), f"{s.mean:.3f}", ci])
    return Section("Seeds: mean and 95% confidence interval", "seeds", [Table(STATS_HEAD, rows), *_verdicts(comp)])


def _time_to_accuracy(comp: Comparison) -> Section | None:
    head, body = comp.time_to_accuracy
    if not body:
        return None
    return Section("Time to accuracy", "time-to-accuracy", [Paragraph(TTA_NOTE), Table(head, body)])


PREDICTION_NOTE = (
    "From the gradient noise scale late in training, B_noise {noise}: predicted optimizer steps and images to reach "
    "the same loss, S/S_min = 1 + B_noise/B and E/E_min = 1 + B/B_noise (McCandlish et al. 2018), B being the images "
    "per optimizer step, relative to batch {ref}; in brackets, the same over the noise scale's 90% interval (an "
    "unbounded interval reaches the limits: steps B_ref/B, images 1x). Predicted wall time is the predicted steps "
    "times each batch's measured seconds per step. The measured columns are where the runs first reached {share}% "
    "of the best mAP50-95 (means over seeds), also relative to batch {ref}: the prediction is about a loss, the "
    "measurement about accuracy, so read them as a check of direction and size, not as equals.")


def _prediction(comp: Comparison) -> Section | None:
    if not comp.predicted or comp.noise is None:
        return None
    note = PREDICTION_NOTE.format(noise=comp.noise.text(), ref=comp.predicted[0].batch,
                                  share=int(prediction.SHARE * 100))
    blocks = [Paragraph(note), Table(prediction.HEAD, prediction.table(comp.predicted))]
    rank = prediction.ranking(comp.predicted)
    return Section("Predicted from the noise scale", "prediction", blocks + ([Paragraph(rank)] if rank else []))


def _plots(comp: Comparison) -> Section:
    return Section("Plots", "plots", [Image(p, p.stem, CAPTIONS.get(p.stem, "")) for p in comp.figures])


def _terms(comp: Comparison) -> Section:
    return Section("Terms", "terms", [Paragraph(GLOSSARY)])


def _folders(comp: Comparison) -> Section:
    return Section("Run folders", "run-folders", [BulletList([f"`{r.path}`" for r in comp.runs])])


ORDER = (_title, _recommendation, _kind, _warnings, _notes, _incomplete, _runs, _seeds, _time_to_accuracy,
         _prediction, _plots, _terms, _folders)


def build(comp: Comparison) -> list[Section]:
    """The report as a list of sections, in ORDER; a section with nothing to say is left out."""
    return [s for make in ORDER if (s := make(comp)) is not None]
