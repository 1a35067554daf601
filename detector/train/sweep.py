"""The sweep use case: one training per batch size and seed in one folder, then the comparison.

`run(config)` is what `detector sweep` calls. Runs are named b<batch>-s<seed>
inside PROJECT/NAME; re-running the same command skips runs that completed,
resumes runs that finished at least one epoch and restarts the rest, so an
interrupted sweep costs at most the epoch in progress.

Two semantics (see the design notes, "Batch semantics"):
- accumulate: Ultralytics' nominal batch nbs (64 unless set) stays fixed, so each
  weight update sees about nbs images whatever the batch;
- true: nbs = batch, so every iteration is a weight update, and lr0 follows the
  batch relative to REFERENCE_BATCH (linear for SGD, square root for Adam-type
  optimizers, or as chosen).
"""

from __future__ import annotations

import logging
import json
import math
import shutil
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from detector import facts
from detector import paths
from detector.config import BUILTIN_OVERRIDES, SWEEP_OPTIONS, TrainConfig, jsonable, parse_list
from detector.errors import DetectorError, RunDirError, TrainingInterrupted, UsageError
from detector.record.writer import Recorder, now_iso, write_json_atomic
from detector.record import mlflow_log
from detector.report import render
from detector.report.analysis import REFERENCE_BATCH
from detector.train import run as train
from detector.train.lock import RunLock

log = logging.getLogger(__name__)

SEMANTICS = ("accumulate", "true")
LR_RULES = ("linear", "sqrt", "none")
ADAM_TYPES = frozenset({"adam", "adamw", "adamax", "nadam", "radam"})
SWEEP_JSON = "sweep.json"
# What makes each run of a sweep: the options it shares, and the batch and seed the sweep sets per run.
RUN_OPTIONS = (*SWEEP_OPTIONS, "batch.requested", "seed")


@dataclass(frozen=True)
class SweepConfig:
    """A sweep: batch sizes x seeds of one training template."""

    batches: tuple[int, ...]
    template: TrainConfig  # data, model, epochs, imgsz, device, workers, overrides, project
    name: str | None = None  # None: sweep-b16-32-64 (so the same command finds the same folder)
    seeds: tuple[int, ...] = (0,)
    semantics: str = "accumulate"
    lr_scaling: str | None = None  # None: linear for SGD, sqrt for Adam-type (true semantics only)


@dataclass(frozen=True)
class PlannedRun:
    """One training of the sweep: its folder name and the overrides that make it what it is."""

    name: str
    batch: int
    seed: int
    overrides: dict = field(default_factory=dict)
    record: dict = field(default_factory=dict)  # run.json config.sweep


def parse_ints(text: str, option: str, minimum: int = 0) -> tuple[int, ...]:
    """'16,32,64' to (16, 32, 64) in that order (the order the runs train in); a repeat is refused."""
    return parse_list(text, option, minimum=minimum)


def lr_factor(batch: int, rule: str) -> float:
    """How much lr0 is multiplied by at batch, relative to REFERENCE_BATCH, under rule."""
    ratio = batch / REFERENCE_BATCH
    return {"linear": ratio, "sqrt": math.sqrt(ratio), "none": 1.0}[rule]


def _resolved(config: SweepConfig, key: str):
    """The value a run would use for key: the user's override, else the built-in demo's, else Ultralytics'."""
    if key in config.template.overrides:
        return config.template.overrides[key]
    if config.template.data is None and key in BUILTIN_OVERRIDES:
        return BUILTIN_OVERRIDES[key]
    from detector.yolo import checks

    return checks.default_train_arg(key)


def plan(config: SweepConfig) -> list[PlannedRun]:
    """The runs of the sweep, in order (batch-major), with their nbs and lr0 decided."""
    if config.semantics not in SEMANTICS:
        raise UsageError(f"--semantics must be one of {', '.join(SEMANTICS)}, not {config.semantics!r}")
    if config.lr_scaling is not None and config.lr_scaling not in LR_RULES:
        raise UsageError(f"--lr-scaling must be one of {', '.join(LR_RULES)}, not {config.lr_scaling!r}")
    if config.semantics == "accumulate" and config.lr_scaling not in (None, "none"):
        raise UsageError("--lr-scaling applies to --semantics true only: with accumulation every weight update "
                         "already sees nbs images, so lr0 stays as it is")
    base = {"sweep": sweep_name(config), "semantics": config.semantics, "reference_batch": REFERENCE_BATCH}
    out = []
    for b in config.batches:
        if config.semantics == "accumulate":
            # The built-in demo sets nbs=16; a sweep of this kind needs one fixed nbs, Ultralytics' 64 unless set.
            nbs = int(config.template.overrides.get("nbs", facts.NBS))
            over, rec = {"nbs": nbs}, {**base, "lr_scaling": None, "nbs": nbs}
        else:
            optimizer, lr0 = str(_resolved(config, "optimizer")), float(_resolved(config, "lr0"))
            if optimizer.lower() == "auto":
                raise UsageError("--semantics true scales lr0, but optimizer 'auto' lets Ultralytics pick its own "
                                 "learning rate; name one, e.g. optimizer=SGD or optimizer=AdamW")
            rule = config.lr_scaling or ("sqrt" if optimizer.lower() in ADAM_TYPES else "linear")
            lr = lr0 * lr_factor(b, rule)
            over = {"nbs": b, "lr0": lr, "optimizer": optimizer}
            rec = {**base, "lr_scaling": rule, "base_lr0": lr0, "lr0": lr, "nbs": b, "optimizer": optimizer}
        for s in config.seeds:
            out.append(PlannedRun(f"b{b}-s{s}", b, s, over, {**rec, "batch": b, "seed": s}))
    return out


def sweep_name(config: SweepConfig) -> str:
    """The sweep's folder name: --name, else one derived from the batches and semantics."""
    if config.name:
        return config.name
    suffix = "" if config.semantics == "accumulate" else "-true"
    return "sweep-b" + "-".join(map(str, config.batches)) + suffix


def _settings(config: SweepConfig) -> dict:
    """What must match for a re-run to continue the same sweep (batches and seeds may grow)."""
    t = asdict(config.template)
    keep = ("data", "model", "epochs", "imgsz", "device", "workers", "overrides")
    return jsonable({"semantics": config.semantics, "lr_scaling": config.lr_scaling,
                            **{k: t[k] for k in keep}})


def open_sweep(config: SweepConfig) -> tuple[Path, RunLock]:
    """Create the sweep folder, or check that an existing one is this sweep; lock it; write sweep.json.

    The lock is held until the sweep ends: a second sweep of the same folder is refused while it lives.
    """
    name = sweep_name(config)
    if not name.strip() or "/" in name or name in {".", ".."}:
        raise UsageError(f"--name must be a plain folder name, not {name!r}")
    folder = Path(config.template.project).expanduser().resolve() / name
    info = folder / SWEEP_JSON
    settings = _settings(config)
    if info.is_file():
        old = json.loads(info.read_text(encoding="utf-8"))
        changed = sorted(k for k in settings if old.get("settings", {}).get(k) != settings[k])
        if changed:
            raise UsageError(f"sweep {folder} was started with other settings ({', '.join(changed)} differ); "
                             "repeat its options to continue it, or choose another --name")
    elif folder.exists() and any(folder.iterdir()):
        raise RunDirError(f"{folder} exists and is not a sweep folder (no {SWEEP_JSON}); choose another --name")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise RunDirError(f"cannot create sweep folder {folder}: {e.strerror}; pass a writable --project") from e
    lock = RunLock(folder, what="sweep").acquire()
    write_json_atomic(info, {"name": name, "settings": settings, "batches": list(config.batches),
                             "seeds": list(config.seeds), "updated": now_iso()})
    return folder, lock


def _state(run_dir: Path) -> str:
    """new, completed, resume (an epoch finished: last.pt exists) or restart (nothing worth keeping)."""
    if not run_dir.exists():
        return "new"
    rec = Recorder(run_dir).read() if (run_dir / "run.json").is_file() else {}
    if rec.get("status") == "completed":
        return "completed"
    return "resume" if (run_dir / "weights" / "last.pt").is_file() else "restart"


def _train_one(config: SweepConfig, folder: Path, p: PlannedRun) -> None:
    run_dir = folder / p.name
    state = _state(run_dir)
    if state == "completed":
        log.info(f"{p.name}: already completed, skipped")
        return
    if state == "resume":
        log.info(f"{p.name}: unfinished, resuming from its last completed epoch")
        train.run(TrainConfig(resume=run_dir, device=config.template.device, command=config.template.command))
        return
    if state == "restart":  # stopped before its first epoch ended: no weights or mAP to keep
        with RunLock(run_dir):  # a run still training holds it: refused, never deleted
            log.info(f"{p.name}: stopped before its first epoch ended, starting it again")
            shutil.rmtree(run_dir)
    train.run(run_config(config, p, folder))


def run_config(config: SweepConfig, p: PlannedRun, folder: Path) -> TrainConfig:
    """The training config of run p: the template with p's batch, seed, name and overrides."""
    return replace(config.template, batch=replace(config.template.batch, requested=p.batch), seed=p.seed, name=p.name,
                   project=folder, overrides={**config.template.overrides, **p.overrides}, sweep=p.record)


def check_inputs(config: SweepConfig, planned: list[PlannedRun]) -> None:
    """Every check the first run would make (options, cfg= keys, weights, model, dataset), and the folder rule,
    before the sweep writes anything: a refused sweep leaves no sweep.json behind."""
    from detector.train.preflight import prepare

    folder = Path(config.template.project).expanduser().resolve() / sweep_name(config)
    _, data, _ = prepare(run_config(config, planned[0], folder))
    paths.check_writes([folder], [data.root], what="--project")


def run(config: SweepConfig) -> Path:
    """Train every run of the sweep that is not finished, then write the comparison; return report.html."""
    planned = plan(config)
    check_inputs(config, planned)
    folder, lock = open_sweep(config)
    try:
        return _train_all(config, planned, folder)
    finally:
        lock.release()


def _train_all(config: SweepConfig, planned: list[PlannedRun], folder: Path) -> Path:
    started, failures = time.time(), []
    for i, p in enumerate(planned, 1):
        log.info(f"[{i}/{len(planned)}] {p.name}: batch {p.batch}, seed {p.seed}, " +
                 ", ".join(f"{k}={v:.6g}" if isinstance(v, float) else f"{k}={v}" for k, v in p.overrides.items()))
        try:
            _train_one(config, folder, p)
        except TrainingInterrupted:
            raise TrainingInterrupted(f"sweep interrupted during {p.name}; run the same command again to continue "
                                      "(completed runs are skipped, unfinished ones resumed)") from None
        except RunDirError:
            raise  # the folder is in use or cannot be written: no later run can do better
        except DetectorError as e:
            if not (folder / p.name / "run.json").is_file():
                raise  # a problem with the options or data: every run would fail the same way
            failures.append(f"{p.name}: {e}")
            log.info(f"{p.name} failed: {e}")
    log.info(f"sweep trained for {(time.time() - started) / 60:.1f} min; writing the comparison")
    existing = [folder / p.name for p in planned if (folder / p.name / "run.json").is_file()]
    html = render.compare(existing, folder)
    if config.template.mlflow:  # the report as an MLflow run, the sweep's runs nested under it
        mlflow_log.log_sweep(config.template.mlflow, folder, existing)
    if failures:
        raise DetectorError(f"{len(failures)} run(s) of the sweep failed ({'; '.join(failures)}); the report "
                            f"{html} shows what finished; run the same command again to retry them")
    return html
