"""The comparison's opening answer: which batch size to use, and why, in a few sentences with numbers.

Pure functions of the runs and their summaries (report.analysis). Three cases:
- clear winner: one batch size's best mAP50-95 is above every other's beyond the
  seed noise (paired by seed);
- within noise: accuracy does not separate them, so the fastest to 90% of the best
  mAP50-95 (that fits in memory) is the one to use;
- insufficient evidence: one seed per batch size, unfinished runs, or runs that
  differ in more than batch size. It says so, gives what the runs do show, and the
  exact `detector sweep` command that would settle it;
- not learned: the runs did not learn enough to compare (see learned()). No batch is
  named; the command trains the same candidates longer, with three seeds, for a number
  of epochs read from the runs (is the loss still falling, when did mAP start to rise).
The other paragraphs (memory, speed, accuracy, gradient noise scale, what was held
fixed) are the evidence, whichever case it is.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass, field, replace

import numpy as np

from detector.config import BUILTIN_OVERRIDES, DEFAULT_SAFETY, SWEEP_OPTIONS, TrainConfig
from detector.record.runs import Run
from detector.report import analysis, prediction, timing

SEEDS_TO_SETTLE = "0,1,2"
LEARN_FLOOR = 0.05  # best mAP50-95 of every run below this: the runs learned nothing worth comparing
RISE = 0.01  # mAP50-95 at which a run counts as having started to learn (the epoch "mAP started to rise")
MIN_EPOCHS = 10  # the fewest epochs the settling command proposes when mAP never rose


@dataclass
class Recommendation:
    """What the Recommendation section says."""

    case: str  # clear | within_noise | insufficient | not_learned | single
    verdict: str
    evidence: list[str] = field(default_factory=list)
    command: str | None = None  # the detector sweep that would settle it


@dataclass
class _Batch:
    batch: int
    runs: list[Run]
    rows: list[dict]

    def mean(self, key: str):
        vals = [r[key] for r in self.rows if r.get(key) is not None]
        return float(np.mean(vals)) if vals else None


def _groups(runs: list[Run], rows: list[dict]) -> list[_Batch]:
    by: dict = {}
    for run, row in zip(runs, rows):
        by.setdefault(row["batch_used"] or 0, ([], []))
        by[row["batch_used"] or 0][0].append(run)
        by[row["batch_used"] or 0][1].append(row)
    return [_Batch(b, rs, ws) for b, (rs, ws) in sorted(by.items())]


def learned(groups: list[_Batch]) -> str | None:
    """None when the runs learned enough to compare; else why not (the rule, with the runs' numbers).

    The rule: the best mAP50-95 of some run reaches LEARN_FLOOR, and, where a batch size
    has several seeds, the highest batch mean of best mAP50-95 is above twice the largest
    seed standard deviation (else the best batch is indistinguishable from nothing learned).
    """
    bests = [r["best_map50_95"] for g in groups for r in g.rows if r.get("best_map50_95") is not None]
    if not bests:
        return "no run has a validated epoch"
    if max(bests) < LEARN_FLOOR:
        return (f"the runs did not learn enough to compare: the best mAP50-95 of any run is {max(bests):.3f}, "
                f"below the floor of {LEARN_FLOOR}")
    spreads = [float(np.std(v, ddof=1)) for g in groups
               if len(v := [r["best_map50_95"] for r in g.rows if r.get("best_map50_95") is not None]) > 1]
    top = max(m for g in groups if (m := g.mean("best_map50_95")) is not None)
    if spreads and top <= 2 * max(spreads):
        return (f"the runs did not learn enough to compare: the highest batch mean of best mAP50-95 ({top:.3f}) is "
                f"not above twice the seed spread (standard deviation up to {max(spreads):.3f})")
    return None


def _train_loss(run: Run) -> np.ndarray | None:
    cols = [run.epochs.get(t) for t in run.train_loss_terms]
    return np.sum(cols, axis=0) if cols and all(c is not None for c in cols) else None


def progress(runs: list[Run]) -> tuple[bool | None, int | None, int]:
    """(is the training loss still falling, the median epoch at which mAP50-95 first reached RISE, epochs run).

    Falling: in most runs the last epoch's training loss is over 1% below the mean of the two before.
    """
    falling, rises, epochs = [], [], 0
    for run in runs:
        loss, m, ep = _train_loss(run), run.epochs.get("map50_95"), run.epochs.get("epoch")
        epochs = max(epochs, len(ep) if ep is not None else 0)
        if loss is not None and len(loss) >= 3:
            falling.append(loss[-1] < 0.99 * np.mean(loss[-3:-1]))
        if m is not None and ep is not None and (hit := np.flatnonzero(m >= RISE)).size:
            rises.append(int(ep[hit[0]]))
    still = None if not falling else sum(falling) > len(falling) / 2
    return still, (int(np.median(rises)) if rises else None), epochs


def _not_learned(runs: list[Run], rows: list[dict], why: str, evidence: list[str]) -> Recommendation:
    """No batch named: what the runs show, and the longer sweep (same candidates, three seeds) that would settle it."""
    falling, rise, epochs = progress(runs)
    planned = int(analysis.ul_config(runs[0]).get("epochs") or epochs or 1)
    if rise is None:
        more = max(3 * planned, MIN_EPOCHS)
        seen = f"mAP50-95 never reached {RISE} in {epochs} epochs"
    else:
        more = max(2 * planned, 4 * rise)
        seen = f"mAP50-95 started to rise at epoch {rise} (median over runs) of {epochs}"
    loss = {True: "the training loss was still falling at the last epoch", None: "the training loss trend is unknown",
            False: "the training loss had stopped falling (more epochs alone may not help: check the learning rate "
                   "and the data)"}[falling]
    return Recommendation("not_learned", f"No recommendation: {why}. In these runs {seen}; {loss}. The "
                          f"command below trains the same batch sizes for {more} epochs with three seeds.",
                          evidence, settle_command(runs, rows, epochs=more))


def _t90(g: _Batch, target: float | None) -> float | None:
    """Mean time to target over the group's runs; None when any run never got there."""
    if target is None:
        return None
    times = [(r.time_s if (r := timing.reach(run, target)) else None) for run in g.runs]
    return None if any(t is None for t in times) or not times else float(np.mean(times))


def _problems(runs: list[Run], rows: list[dict], kind: analysis.Kind, warnings: list[str]) -> list[str]:
    out = []
    if len({r["batch_used"] for r in rows}) < 2:
        out.append("only one batch size was run")
    unfinished = [r["run"] for r in rows if r["status"] != "completed"]
    if unfinished:
        out.append(f"{', '.join(unfinished)} did not finish")
    if warnings or kind.name == "mixed":
        out.append("the runs differ in more than batch size (see the warning below)")
    seeds = [len(g.rows) for g in _groups(runs, rows)]
    if seeds and min(seeds) < 2:
        out.append("there is one seed per batch size, so seed-to-seed noise is unmeasured")
    return out


def _memory(groups: list[_Batch]) -> str:
    peaks = [(g.batch, g.mean("peak_gpu_mem_gb")) for g in groups]
    if all(p is None for _, p in peaks):
        return ("Memory: not measured (CPU runs record no GPU memory); on the planned GPU, `detector batch` "
                "measures which of these batch sizes fits.")
    total = next(((r.meta.get("device") or {}).get("total_memory_gb") for g in groups for r in g.runs
                  if (r.meta.get("device") or {}).get("total_memory_gb")), None)
    parts = []
    for b, p in peaks:
        if p is None:
            parts.append(f"batch {b}: not recorded")
        elif total:
            verdict = "fits" if p <= DEFAULT_SAFETY * total else "near the limit"
            parts.append(f"batch {b}: {p:.1f} of {total:.0f} GiB ({verdict})")
        else:
            parts.append(f"batch {b}: {p:.1f} GiB")
    return "Memory (peak reserved on the recorded GPU): " + "; ".join(parts) + "."


def _speed(groups: list[_Batch], best: float | None) -> str:
    ips = "; ".join(f"batch {g.batch} {v:.1f}" for g in groups if (v := g.mean("images_per_s")) is not None)
    out = f"Speed (images/s, median epoch): {ips}." if ips else "Speed: no completed epoch yet."
    if best is not None:
        t = "; ".join(f"batch {g.batch} " + ("never" if (v := _t90(g, 0.9 * best)) is None else f"{v:.0f} s")
                      for g in groups)
        out += f" Wall time to 90% of the best mAP50-95 ({0.9 * best:.3f}): {t}."
    return out


def _accuracy(groups: list[_Batch], rows: list[dict]) -> tuple[str, list[int]]:
    """The accuracy paragraph and the batches no other batch beats beyond the seed noise."""
    means = "; ".join(f"batch {g.batch} {v:.3f}" + (f" ({len(g.rows)} seeds)" if len(g.rows) > 1 else "")
                      for g in groups if (v := g.mean("best_map50_95")) is not None)
    pairs = analysis.paired_differences(rows, "best_map50_95")
    beaten = {(a if mean > 0 else b) for a, b, _, mean, low, high in pairs if not low <= 0 <= high}
    if not pairs:
        return f"Accuracy (best mAP50-95): {means}; no seed noise to judge the differences by.", []
    shown = "; ".join(f"{b} − {a}: {mean:+.3f} ({low:+.3f} to {high:+.3f})" for a, b, _, mean, low, high in pairs)
    ok = [g.batch for g in groups if g.batch not in beaten]
    return (f"Accuracy (best mAP50-95, mean over seeds): {means}. Paired by seed, 95% intervals: {shown}; "
            + ("all within the seed noise." if not beaten else
               f"batch {', '.join(map(str, sorted(beaten)))} lower beyond the noise.")), ok


def _noise(runs: list[Run], rows: list[dict], kind: analysis.Kind) -> str | None:
    ns = prediction.pooled(runs)
    if ns is None:
        return None
    head = (f"Gradient noise scale: late in training (last third of epochs, median over runs) B_simple is "
            f"{ns.text()}. Steps to a given loss scale as 1 + B_simple/B and images as 1 + B/B_simple (McCandlish "
            "et al. 2018), B being the images per optimizer step")
    if kind.name == "accumulate":
        return head + (". With accumulation every run steps on the same images, so this speaks to nbs, not to "
                       "the batch.")
    cands = prediction.candidates(runs, rows, ns)
    if len(cands) < 2:
        return head + "."
    ref = cands[0]
    per = "; ".join(f"batch {c.batch} ({c.per_step:.0f} per step): {c.steps[0]:.2f}x the steps, "
                    f"{c.images[0]:.2f}x the images" for c in cands[1:])
    out = f"{head}. Predicted against batch {ref.batch} ({ref.per_step:.0f} images per step): {per}"
    out += " (intervals in the table below)." if ns.has_interval else "."
    rank = prediction.ranking(cands)
    return out + (f" {rank}" if rank else "")


def held_fixed(runs: list[Run], rows: list[dict], kind: analysis.Kind) -> str:
    """One sentence: what the compared runs held fixed (images per update, learning-rate rule, epochs, ...)."""
    cfg = analysis.ul_config(runs[0])
    per_step = sorted({r["images_per_step"] for r in rows if r["images_per_step"]})
    if kind.name == "accumulate":
        update = f"images per weight update ({per_step[0]}: nbs {rows[0]['nbs']}, gradients accumulated)"
    elif kind.name == "true":
        update = "every iteration a weight update (nbs = batch; images per update follow the batch)"
    else:
        update = f"not the images per weight update ({', '.join(map(str, per_step))} differ)"
    lrs = sorted({r["lr0"] for r in rows if r["lr0"] is not None})
    rules = {r["lr_rule"] for r in rows} - {None}
    lr = (f"lr0 {lrs[0]:.4g} for every batch" if len(lrs) == 1 else
          f"lr0 scaled with the batch ({rules.pop()} rule: {', '.join(f'{v:.4g}' for v in lrs)})" if len(rules) == 1
          else f"lr0 differs ({', '.join(f'{v:.4g}' for v in lrs)})")
    return (f"Held fixed: {update}; {lr}; {cfg.get('epochs', '?')} epochs; optimizer {rows[0]['optimizer']}; "
            f"imgsz {cfg.get('imgsz', '?')}; model {runs[0].meta.get('model')}; the dataset.")


def _same_sweep_command(runs: list[Run]) -> list[str] | None:
    """The argv of the `detector sweep` every run came from, when they share one (else None)."""
    cmds = {tuple((r.meta.get("config") or {}).get("command") or ()) for r in runs}
    cmd = list(cmds.pop()) if len(cmds) == 1 else []
    if len(cmd) < 2 or cmd[1] != "sweep":
        return None
    return ["detector", *cmd[1:]]


def _with_seeds(argv: list[str]) -> list[str]:
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--seeds":
            skip = True
        elif not a.startswith("--seeds="):
            out.append(a)
    return out[:2] + ["--seeds", SEEDS_TO_SETTLE] + out[2:]


def _longer(argv: list[str], epochs: int, folder: str) -> list[str]:
    """argv with --epochs set and a new --name: a sweep folder refuses changed options, so the longer one gets its own."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a in ("--epochs", "--name"):
            skip = True
        elif not a.startswith(("--epochs=", "--name=")):
            out.append(a)
    return out + ["--epochs", str(epochs), "--name", f"{folder}-e{epochs}"]


def settle_command(runs: list[Run], rows: list[dict], epochs: int | None = None) -> str:
    """The detector sweep that would settle the question: these batches, three seeds, the same settings.

    Runs of one sweep get their own command back with --seeds 0,1,2: re-running it
    continues the same folder (finished runs are skipped). Other runs get a sweep
    built from the first run's settings. With epochs, the sweep trains that many epochs
    instead, in a folder of its own (the old name with -e<epochs>).
    """
    argv = _settle_argv(runs, rows)
    if epochs is not None:
        folder = ((runs[0].meta.get("config") or {}).get("sweep") or {}).get("sweep") or runs[0].path.parent.name
        argv = _longer(argv, epochs, folder)
    return shlex.join(argv)


def _settle_argv(runs: list[Run], rows: list[dict]) -> list[str]:
    same = _same_sweep_command(runs)
    if same:
        return _with_seeds(same)
    cfg = runs[0].meta.get("config") or {}
    sweep = cfg.get("sweep") or {}
    batches = sorted({b for r in rows if (b := r["batch_used"] or r["batch_requested"]) is not None}, key=int)
    args = ["detector", "sweep", "--batch", ",".join(map(str, batches)), "--seeds", SEEDS_TO_SETTLE]
    if sweep.get("semantics") == "true":
        args += ["--semantics", "true"] + (["--lr-scaling", sweep["lr_scaling"]] if sweep.get("lr_scaling") else [])
    template = TrainConfig.from_record(cfg)
    args += template.to_argv(only=[k for k in SWEEP_OPTIONS if k != "overrides"])
    if sweep.get("sweep") and runs[0].path.parent.name == sweep["sweep"]:  # continue that sweep: same folder
        args += ["--project", str(runs[0].path.parent.parent), "--name", sweep["sweep"]]
    by_sweep = {"nbs", "lr0"} if sweep.get("lr0") else {"nbs"}  # set per run by the sweep itself
    builtin = BUILTIN_OVERRIDES if cfg.get("data") is None else {}
    overrides = dict(template.overrides)
    if sweep.get("semantics") == "true":  # the sweep scaled lr0 from its base: give the base back
        overrides.update({k: sweep[s] for k, s in (("optimizer", "optimizer"), ("lr0", "base_lr0")) if sweep.get(s)})
        by_sweep = {"nbs"}
    kept = {k: v for k, v in sorted(overrides.items()) if k not in by_sweep and not (k in builtin and builtin[k] == v)}
    args += replace(template, overrides=kept).to_argv(only=["overrides"])
    return args


def recommend(runs: list[Run], rows: list[dict], kind: analysis.Kind, warnings: list[str]) -> Recommendation:
    """The Recommendation section: the verdict first, then the evidence, and a command when it is not settled."""
    groups = _groups(runs, rows)
    best = timing.best_map(runs)
    accuracy, acc_ok = _accuracy(groups, rows)
    evidence = [_memory(groups), _speed(groups, best), accuracy]
    evidence += [s for s in (_noise(runs, rows, kind),) if s] + [held_fixed(runs, rows, kind)]
    if len(groups) < 2:
        return Recommendation("single", "One batch size: nothing to choose between; the figures below describe it.",
                              evidence, settle_command(runs, rows))
    why = learned(groups)
    if why is not None:
        return _not_learned(runs, rows, why, evidence)
    fastest = _fastest(groups, best, acc_ok or [g.batch for g in groups])
    problems = _problems(runs, rows, kind, warnings)
    if problems:
        lean = f" On these runs batch {fastest} was the fastest to 90% of the best mAP50-95." if fastest else ""
        return Recommendation("insufficient", "Not enough evidence to recommend a batch size: " + "; ".join(problems)
                              + "." + lean + " The command below would settle it.", evidence,
                              settle_command(runs, rows))
    if len(acc_ok) == 1:
        g = next(x for x in groups if x.batch == acc_ok[0])
        return Recommendation("clear", f"Use batch {g.batch}: its best mAP50-95 ({g.mean('best_map50_95'):.3f}, mean "
                              f"of {len(g.rows)} seeds) is above every other batch size's beyond the seed noise.",
                              evidence)
    why = f"batch {fastest} is the fastest of them to 90% of the best mAP50-95" if fastest else \
        "none reached 90% of the best mAP50-95, so the highest throughput decides"
    pick = fastest or max(groups, key=lambda g: g.mean("images_per_s") or 0).batch
    return Recommendation("within_noise", f"Use batch {pick}: accuracy is within the seed noise between batch "
                          f"{', '.join(map(str, acc_ok))}, and {why}.", evidence)


def _fastest(groups: list[_Batch], best: float | None, allowed: list[int]) -> int | None:
    """The allowed batch with the shortest mean wall time to 90% of the best mAP50-95; None if none got there."""
    times = [(t, g.batch) for g in groups if g.batch in allowed and (t := _t90(g, 0.9 * best if best else None))]
    return min(times)[1] if times else None
