"""What a comparison of runs says: per-run figures, the kind of comparison, confounders, seed noise.

Pure functions of runs read by detector.record.runs; report.comparison gathers
their results for the report (report.sections lays it out, report.emit writes it).
Nothing here draws or writes files.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from detector import facts
from detector.record.runs import Run, steps_per_epoch

REFERENCE_BATCH = 64  # the batch whose learning rate a sweep's lr0 is, under --semantics true

# Ultralytics' augmentation hyperparameters: runs that differ in these are not a batch-only comparison.
UL_AUGMENT_KEYS = ("hsv_h", "hsv_s", "hsv_v", "degrees", "translate", "scale", "shear", "perspective", "flipud",
                   "fliplr", "bgr", "mosaic", "mixup", "cutmix", "copy_paste", "copy_paste_mode", "auto_augment",
                   "erasing", "close_mosaic")
# Keys that differ between runs of a batch comparison by design, or that only name the run.
_BY_DESIGN = {"batch", "name", "project", "exist_ok", "seed", "nbs", "lr0", "data"}

# Two-sided 95% quantiles of Student's t for 1..30 degrees of freedom (then ~1.96).
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
         2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


def _last(a: np.ndarray | None):
    if a is None:
        return None
    ok = a[~np.isnan(a)]
    return float(ok[-1]) if len(ok) else None


def _median(a: np.ndarray | None):
    if a is None or not np.any(~np.isnan(a)):
        return None
    return float(np.nanmedian(a))


def _loss_sum(run: Run, columns: list[str], row: int):
    if not columns or not len(run.epochs) or any(run.epochs.get(c) is None for c in columns):
        return None
    vals = [run.epochs.get(c)[row] for c in columns]
    return None if any(np.isnan(v) for v in vals) else float(sum(vals))


def batch_used(run: Run):
    """The batch the run really trained with (after any out-of-memory step-down)."""
    b = run.meta.get("batch") or {}
    return b.get("used") or b.get("chosen")


def ul_config(run: Run) -> dict:
    """The arguments handed to Ultralytics, as recorded in run.json."""
    return (run.meta.get("config") or {}).get("ultralytics") or {}


def summary(run: Run, train_terms: list[str] | None = None, val_terms: list[str] | None = None) -> dict:
    """The per-run figures of the report's table (None where the run has not got that far).

    Final losses sum train_terms/val_terms (the terms every compared run shares), else all the run's own terms.
    """
    meta, ep = run.meta, run.epochs
    used, nbs = batch_used(run), meta.get("nbs")
    # Before training starts run.json has no accumulate yet; Ultralytics will use this one.
    acc = meta.get("accumulate") or (facts.accumulate(used, nbs) if nbs and used else None)
    m5095 = ep.get("map50_95")
    best_i = int(np.nanargmax(m5095)) if m5095 is not None and np.any(~np.isnan(m5095)) else None
    steps = steps_per_epoch(run)
    complete = [e for e in steps if e <= len(ep)]
    peak = ep.get("peak_gpu_mem_gb")
    time_s = run.iterations.get("time_s")
    epoch_times = ep.get("epoch_time_s")
    return {
        "run": run.name, "status": run.status, "seed": (meta.get("config") or {}).get("seed"),
        "batch_requested": (meta.get("batch") or {}).get("requested"), "batch_used": used,
        "nbs": nbs, "accumulate": acc,
        "images_per_step": used * acc if used and acc else None,
        "optimizer": meta.get("optimizer"), "lr0": meta.get("lr0"),
        "epochs_done": len(ep),
        "epochs_planned": ul_config(run).get("epochs") or (meta.get("progress") or {}).get("epochs"),
        "iterations_per_epoch": meta.get("iterations_per_epoch"),
        "steps_per_epoch": steps[complete[-1]] if complete else None,
        "optimizer_steps": int(np.nanmax(run.iterations.get("optimizer_step"))) if len(run.iterations) else None,
        "images_per_s": _median(ep.get("images_per_s")), "epoch_time_s": _median(epoch_times),
        "train_time_s": float(np.nansum(epoch_times)) if epoch_times is not None and len(ep) else _last(time_s),
        "peak_gpu_mem_gb": float(np.nanmax(peak)) if peak is not None and np.any(~np.isnan(peak)) else None,
        "best_map50_95": float(m5095[best_i]) if best_i is not None else None,
        "best_epoch": int(ep.get("epoch")[best_i]) if best_i is not None else None,
        "final_map50": _last(ep.get("map50")), "final_map50_95": _last(m5095),
        "final_train_loss": _loss_sum(run, run.train_loss_terms if train_terms is None else train_terms, -1),
        "final_val_loss": _loss_sum(run, run.val_loss_terms if val_terms is None else val_terms, -1),
        "lr_rule": _lr_rule((meta.get("config") or {}).get("sweep") or {}),
    }


def _lr_rule(sweep: dict) -> str | None:
    """How a sweep set this run's lr0: a scaling rule, or unscaled under accumulation; None outside sweeps."""
    if sweep.get("lr_scaling"):
        return sweep["lr_scaling"]
    return "unscaled (nbs fixed)" if sweep.get("semantics") == "accumulate" else None


@dataclass
class Kind:
    """Which kind of batch comparison the runs make, in words."""

    name: str  # accumulate | true | mixed | single
    text: str


def comparison_kind(rows: list[dict]) -> Kind:
    """Same images per weight update (nbs accumulation), true batch sizes, or a mix."""
    if len(rows) < 2:
        return Kind("single", "One run: nothing to compare against; the table and plots describe it alone.")
    acc = [r["accumulate"] for r in rows]
    per_step = sorted({r["images_per_step"] for r in rows if r["images_per_step"]})
    pairs = ", ".join(sorted({f"batch {r['batch_used']} x {r['accumulate']}" for r in rows if r["accumulate"]},
                             key=lambda s: int(s.split()[1])))
    if all(a == 1 for a in acc):
        return Kind("true", (
            "True batch sizes: every iteration is a weight update (accumulate 1; nbs is at most the batch), so a "
            "larger batch makes fewer optimizer steps per epoch, each from more images. The learning rate decides "
            "much of the outcome here; the table shows the lr0 each run used and the rule that set it."))
    if len(per_step) == 1 and None not in acc:
        return Kind("accumulate", (
            f"Same images per weight update: Ultralytics accumulated gradients to its nominal batch size "
            f"(nbs) so every optimizer step saw {per_step[0]} images ({pairs} iterations). Every run makes about the "
            "same number of weight updates per epoch; what the batch size changes is the BatchNorm batch, the "
            "gradient noise inside a step, speed and memory. For true batch sizes, use nbs equal to the batch "
            "(detector sweep --semantics true)."))
    capped = [r["run"] for r in rows if _capped(r)]
    why = (f" Ultralytics capped accumulate at the number of iterations in the whole training for "
           f"{', '.join(capped)}: training this short cannot reach nbs={rows[0]['nbs']} images per step."
           if capped else "")
    return Kind("mixed", (
        f"Mixed: the runs differ in images per weight update ({pairs} iterations per step), so batch size and "
        f"the number of weight updates change together; differences cannot be put down to batch size alone.{why}"))


def _capped(row: dict) -> bool:
    """Whether Ultralytics cut accumulate to iterations_per_epoch x epochs (its 8.4 cap for very short runs)."""
    nbs, b, acc, ipe, ep = (row.get(k) for k in ("nbs", "batch_used", "accumulate", "iterations_per_epoch",
                                                  "epochs_planned"))
    if not (nbs and b and acc and ipe and ep):
        return False
    return acc < facts.accumulate(b, nbs) and acc == ipe * ep


def _describe(value) -> str:
    return "(default)" if value is None else str(value)


def differences(runs: list[Run], rows: list[dict], kind: Kind) -> tuple[list[str], list[str]]:
    """(warnings, notes): how the runs differ besides batch size; notes list differences that are by design."""
    warnings, notes = [], []
    names = [r.name for r in runs]

    def check(label: str, values: list):
        if len({repr(v) for v in values}) > 1:
            shown = "; ".join(f"{n}: {_describe(v)}" for n, v in zip(names, values))
            warnings.append(f"{label} differs ({shown}).")

    check("The dataset (fingerprint)", [(r.meta.get("dataset") or {}).get("fingerprint") for r in runs])
    check("The model", [r.meta.get("model") for r in runs])
    check("The device", [(r.meta.get("device") or {}).get("name") for r in runs])
    for key in ("imgsz", "epochs"):
        check(f"{key}", [ul_config(r).get(key) for r in runs])
    check("The optimizer", [r["optimizer"] for r in rows])
    check("The Albumentations pipeline", [r.meta.get("augmentations") for r in runs])
    cfgs = [ul_config(r) for r in runs]
    keys = sorted(set().union(*cfgs) - _BY_DESIGN - {"epochs", "imgsz", "model"})
    for key in keys:
        label = f"The augmentation setting {key}" if key in UL_AUGMENT_KEYS else f"The training argument {key}"
        check(label, [c.get(key) for c in cfgs])
    check("The Ultralytics/PyTorch versions", [((r.meta.get("versions") or {}).get("ultralytics"),
                                                (r.meta.get("versions") or {}).get("torch")) for r in runs])
    _seed_check(rows, warnings, notes)
    _lr_check(rows, kind, warnings, notes)
    return warnings, notes


def _seed_check(rows, warnings, notes) -> None:
    seeds_by_batch: dict = {}
    for r in rows:
        seeds_by_batch.setdefault(r["batch_used"], set()).add(r["seed"])
    sets = {frozenset(s) for s in seeds_by_batch.values()}
    all_seeds = sorted({r["seed"] for r in rows}, key=str)
    if len(all_seeds) == 1:
        return
    if len(sets) == 1:
        notes.append(f"Seeds {', '.join(map(str, all_seeds))} were run for every batch size: "
                     "seed-to-seed spread is measured, not confounded with batch size.")
    else:
        shown = "; ".join(f"batch {b}: seeds {sorted(s, key=str)}" for b, s in seeds_by_batch.items())
        warnings.append(f"The seeds differ between batch sizes ({shown}); a gap may be seed noise.")


def _lr_check(rows, kind: Kind, warnings, notes) -> None:
    lrs = {r["lr0"] for r in rows}
    if len(lrs) <= 1:
        return
    shown = "; ".join(f"{r['run']}: {r['lr0']:.6g}" for r in rows if r["lr0"] is not None)
    rules = {r["lr_rule"] for r in rows}
    if kind.name == "true" and None not in rules and len(rules) == 1:
        notes.append(f"lr0 was scaled with the batch by the {rules.pop()} rule relative to batch "
                     f"{REFERENCE_BATCH} ({shown}).")
    else:
        warnings.append(f"The initial learning rate lr0 differs ({shown}).")


def shared_loss_terms(runs: list[Run]) -> tuple[list[str], list[str], list[str]]:
    """The loss terms every run records: per iteration, and as epochs.csv's train_/val_ columns."""
    shared, _ = shared_columns(runs, "loss_terms")
    train = [f"train_{t}" for t in shared if all(f"train_{t}" in r.train_loss_terms for r in runs)]
    val = [f"val_{t}" for t in shared if all(f"val_{t}" in r.val_loss_terms for r in runs)]
    return shared, train, val


def shared_columns(runs: list[Run], attr: str) -> tuple[list[str], dict[str, list[str]]]:
    """Columns (attr: loss_terms or val_loss_terms) every run has, and per run the ones others lack."""
    sets = [getattr(r, attr) for r in runs]
    shared = [c for c in sets[0] if all(c in s for s in sets[1:])] if sets else []
    only = {r.name: [c for c in s if c not in shared] for r, s in zip(runs, sets)}
    return shared, {k: v for k, v in only.items() if v}


@dataclass
class GroupStat:
    """Mean and 95% t-interval of one metric over the seeds of one batch size."""

    batch: int
    n: int
    mean: float
    half_width: float | None  # None with a single run
    values: list[float] = field(default_factory=list)

    @property
    def low(self) -> float:
        return self.mean - (self.half_width or 0.0)

    @property
    def high(self) -> float:
        return self.mean + (self.half_width or 0.0)


def t975(df: int) -> float:
    """The two-sided 95% quantile of Student's t with df degrees of freedom."""
    return _T975[df - 1] if df <= len(_T975) else 1.96


def group_stats(rows: list[dict], metric: str) -> list[GroupStat]:
    """Per batch size: mean and 95% t-interval of metric over completed runs (seeds)."""
    groups: dict = {}
    for r in rows:
        if r["status"] == "completed" and r[metric] is not None:
            groups.setdefault(r["batch_used"], []).append(r[metric])
    out = []
    for batch, vals in sorted(groups.items()):
        n, mean = len(vals), float(np.mean(vals))
        half = t975(n - 1) * float(np.std(vals, ddof=1)) / math.sqrt(n) if n >= 2 else None
        out.append(GroupStat(batch, n, mean, half, vals))
    return out


def paired_differences(rows: list[dict], metric: str) -> list[tuple]:
    """(batch a, batch b, seeds, mean of b − a, 95% low, 95% high) per pair of batches sharing at least 2 seeds."""
    by_batch: dict = {}
    for r in rows:
        if r["status"] == "completed" and r[metric] is not None and r.get("seed") is not None:
            by_batch.setdefault(r["batch_used"], {})[r["seed"]] = r[metric]
    out = []
    batches = sorted(by_batch)
    for i, a in enumerate(batches):
        for b in batches[i + 1:]:
            seeds = sorted(set(by_batch[a]) & set(by_batch[b]))
            if len(seeds) < 2:
                continue
            diffs = np.array([by_batch[b][s] - by_batch[a][s] for s in seeds])
            mean = float(diffs.mean())
            half = t975(len(seeds) - 1) * float(diffs.std(ddof=1)) / math.sqrt(len(seeds))
            out.append((a, b, len(seeds), mean, mean - half, mean + half))
    return out


def paired_verdicts(rows: list[dict], metric: str, label: str) -> list[str]:
    """Per pair of batch sizes run with the same seeds: the mean paired difference and its 95% t-interval.

    Pairing by seed removes what each seed does to both runs (same initial weights,
    same data order), so it can show a difference that unpaired intervals hide.
    """
    out = []
    for a, b, n, mean, low, high in paired_differences(rows, metric):
        verdict = ("within the noise (the interval includes 0)" if low <= 0 <= high else
                   f"batch {b} is {'higher' if mean > 0 else 'lower'} beyond the seed noise")
        out.append(f"{label}, paired by seed ({n} seeds): batch {b} minus batch {a} = {mean:+.3f} "
                   f"(95% interval {low:+.3f} to {high:+.3f}): {verdict}.")
    return out


SINGLE_SEED = ("One run per batch size: there is no measure of seed-to-seed noise, so a difference in mAP of a few "
               "points may be chance. Run several seeds (detector sweep --seeds 0,1,2) to get confidence intervals.")


def noise_verdict(stats: list[GroupStat], label: str) -> str:
    """One plain sentence: are the differences between batch sizes within the seed noise?"""
    if len(stats) < 2:
        return ""
    if any(s.half_width is None for s in stats):
        return (f"{label}: at least one batch size has a single run, so the seed-to-seed noise is unknown; "
                "treat differences of a few points as possibly chance (re-run with --seeds 0,1,2).")
    gap = max(s.mean for s in stats) - min(s.mean for s in stats)
    apart = [(a, b) for i, a in enumerate(stats) for b in stats[i + 1:] if a.high < b.low or b.high < a.low]
    if not apart:
        return (f"{label}: the differences between batch sizes (largest gap {gap:.3f}) are within the noise: "
                "every pair of 95% intervals overlaps, so these runs do not show that batch size changed it.")
    shown = "; ".join(f"batch {a.batch} ({a.mean:.3f} ± {a.half_width:.3f}) vs batch {b.batch} "
                      f"({b.mean:.3f} ± {b.half_width:.3f})" for a, b in apart)
    return f"{label}: these intervals do not overlap, a difference larger than the seed-to-seed noise: {shown}."
