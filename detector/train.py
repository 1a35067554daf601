"""The train use case: check inputs, decide the batch, open the record, run Ultralytics.

`run(config)` is what `detector train` calls. Every check that can fail on bad
input runs before the run folder is created, so a refused command leaves
nothing behind and overwrites nothing.
"""

from __future__ import annotations

import os
import platform
import signal
import sys
import time
import traceback
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime
from pathlib import Path

import yaml

from detector import autobatch, batching, datasets, runtime, stepdown, synth
from detector.errors import DetectorError, RunDirError, TrainingInterrupted, UsageError
from detector.recorder import Recorder

# The built-in dataset's demo settings, used when --data is not given and the user
# did not set the option. Measured on the 2-core CPU (README, "Performance"):
# nbs=16 makes every batch-16 iteration a weight update (4x the updates of
# Ultralytics' nbs=64 on 400 images), and AdamW at 0.002 beat SGD at 0.02
# (mAP50 0.94 vs 0.65 after 20 epochs); mosaic off suits 128-px images.
BUILTIN_DEFAULTS = {"epochs": 20, "imgsz": 128}
BUILTIN_OVERRIDES = {"nbs": 16, "optimizer": "AdamW", "lr0": 0.002, "warmup_epochs": 1, "mosaic": 0.0}


@dataclass(frozen=True)
class TrainConfig:
    """Every option of one training, resolved by the CLI and passed down unchanged."""

    data: Path | None = None  # None: the built-in dataset
    model: str = "yolo11n.yaml"
    epochs: int | None = None  # None: 100, or the built-in demo's value
    imgsz: int | None = None  # None: 640, or the built-in demo's value
    batch: str | int = "auto"
    device: str | None = None
    workers: int = 8
    seed: int = 0
    name: str | None = None
    project: Path = Path("runs")
    resume: Path | None = None
    overrides: dict = field(default_factory=dict)  # other Ultralytics training arguments
    augment: str | None = None  # Albumentations pipeline: preset name or A.save file; None: Ultralytics' default
    batch_candidates: tuple = batching.DEFAULT_CANDIDATES
    batch_safety: float = batching.DEFAULT_SAFETY  # share of GPU memory the measured peak may use
    command: tuple = ()
    sweep: dict | None = None  # set by `detector sweep`: its name, semantics and lr rule, recorded in run.json config


def parse_overrides(pairs: tuple[str, ...]) -> dict:
    """'key=value' strings to a dict, values typed as YAML reads them (0.01, true, [1, 2])."""
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise UsageError(f"expected key=value for an Ultralytics training argument, got {pair!r}")
        try:
            out[key.strip()] = yaml.safe_load(value) if value.strip() else None
        except yaml.YAMLError:
            out[key.strip()] = value
    return out


def with_builtin_defaults(config: TrainConfig) -> TrainConfig:
    """config with the built-in demo's settings filled in where the user left them unset (no --data only)."""
    if config.data is not None:
        return config
    overrides = {**BUILTIN_OVERRIDES, **config.overrides}
    return replace(
        config,
        epochs=config.epochs if config.epochs is not None else BUILTIN_DEFAULTS["epochs"],
        imgsz=config.imgsz if config.imgsz is not None else BUILTIN_DEFAULTS["imgsz"],
        overrides=overrides,
    )


def check_options(config: TrainConfig) -> None:
    """Refuse option values that cannot train (UsageError), before anything is loaded."""
    if config.epochs is not None and config.epochs < 1:
        raise UsageError(f"--epochs must be at least 1, not {config.epochs}")
    if config.imgsz is not None and config.imgsz < 32:
        raise UsageError(f"--imgsz must be at least 32 (the model's largest stride), not {config.imgsz}")
    if config.workers < 0:
        raise UsageError(f"--workers must be 0 or more, not {config.workers}")
    if config.name is not None and (not config.name.strip() or "/" in config.name or config.name in {".", ".."}):
        raise UsageError(f"--name must be a plain folder name, not {config.name!r}")


def _make_run_dir(project: Path, name: str | None) -> Path:
    """Create project/name (never reusing an existing folder) and return it."""
    project = project.expanduser().resolve()
    try:
        project.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise RunDirError(f"cannot create project folder {project}: {e.strerror}; pass a writable --project") from e
    if not os.access(project, os.W_OK | os.X_OK):
        raise RunDirError(f"project folder {project} is not writable; pass a writable --project")
    name = name or datetime.now().strftime("train-%Y%m%d-%H%M%S")
    run_dir = project / name
    try:
        run_dir.mkdir()
    except FileExistsError:
        raise RunDirError(
            f"run {run_dir} already exists; choose another --name, or continue it with --resume {run_dir}"
        ) from None
    except OSError as e:
        raise RunDirError(f"cannot create run folder {run_dir}: {e.strerror}") from e
    return run_dir


def prepare(config: TrainConfig, echo=print) -> tuple[TrainConfig, datasets.DatasetInfo, str]:
    """Check every option, the model and the dataset, as `train` does before creating a run folder.

    Returns the config with the built-in demo's defaults applied, the checked
    dataset and the model spec Ultralytics will load. Shared by `train`,
    `detector batch` and the benchmarks.
    """
    check_options(config)
    config = with_builtin_defaults(config)
    batching.parse_batch(config.batch)
    from detector import yolo  # imports ultralytics: after the cheap checks

    yolo.check_overrides(config.overrides)
    model = yolo.check_model(config.model)  # refused before the dataset is read
    return config, _dataset(config, echo), model


def _dataset(config: TrainConfig, echo) -> datasets.DatasetInfo:
    """The dataset, checked (cached by fingerprint): one with errors is refused before any run folder exists."""
    from detector import dataset_check

    return dataset_check.require_trainable(_load_dataset(config, echo), echo)


def _load_dataset(config: TrainConfig, echo) -> datasets.DatasetInfo:
    if config.data is not None:
        return datasets.load(config.data)
    spec = synth.SynthSpec(seed=0)
    shown = [0]

    def progress(done, total):
        pct = done * 100 // total
        if pct >= shown[0] + 25 or done == total:
            shown[0] = pct
            echo(f"  generating built-in dataset: {done}/{total} images")

    return datasets.load(synth.ensure(spec, runtime.datasets_cache(), progress))


class _SigtermAsInterrupt:
    """Treat SIGTERM like Ctrl-C while training, so a killed job is marked interrupted, not left running."""

    def __enter__(self):
        self._old = signal.signal(signal.SIGTERM, self._raise) if _main_thread() else None
        return self

    @staticmethod
    def _raise(signum, frame):
        raise KeyboardInterrupt

    def __exit__(self, *exc):
        if self._old is not None:
            signal.signal(signal.SIGTERM, self._old)
        return False


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def _supervise(recorder: Recorder, run_dir: Path, work) -> dict:
    """Run work() and leave run.json completed, interrupted or failed whatever happens."""
    try:
        with _SigtermAsInterrupt():
            outcome = work()
    except KeyboardInterrupt:
        recorder.finish("interrupted")
        raise TrainingInterrupted(
            f"training interrupted; {run_dir} keeps every completed row and epoch, continue with --resume {run_dir}"
        ) from None
    except DetectorError as e:
        recorder.finish("failed", error=str(e))
        raise
    except Exception as e:  # Ultralytics or PyTorch failed: keep the traceback in the run, say one line here
        (run_dir / "error.log").write_text(traceback.format_exc(), encoding="utf-8")
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        recorder.finish("failed", error=f"{type(e).__name__}: {first}")
        raise DetectorError(f"training failed: {type(e).__name__}: {first} (traceback in {run_dir / 'error.log'})") from e
    recorder.merge("batch", used=outcome["batch_used"])
    recorder.finish("completed")
    return outcome


def run(config: TrainConfig, echo=print) -> Path:
    """Train one run and return its folder."""
    if config.resume is not None:
        return resume(config, echo)
    from detector import augment

    config, data, model = prepare(config, echo)
    pipeline = augment.resolve(config.augment, config.imgsz or 640)
    from detector import yolo

    device = yolo.device_info(config.device)
    decision = autobatch.decide(config, data, device, echo)
    run_dir = _make_run_dir(config.project, config.name)
    data_yaml = data.write_resolved(run_dir / "data.yaml")
    echo(autobatch.describe(decision))
    echo(f"augmentations {pipeline.describe()}")
    ul_args = {
        **config.overrides,
        "data": str(data_yaml), "model": model, "epochs": config.epochs or 100, "imgsz": config.imgsz or 640,
        "batch": decision.chosen, "workers": config.workers, "seed": config.seed,
        "project": str(run_dir.parent), "name": run_dir.name, "exist_ok": True,
        "augmentations": list(pipeline.transforms),  # replaces Ultralytics' default set; kept in its checkpoints
    }
    if config.device is not None:
        ul_args["device"] = config.device
    recorder = Recorder(run_dir)
    recorder.start({
        "name": run_dir.name, "command": list(config.command) or sys.argv, "pid": os.getpid(), "host": platform.node(),
        "config": {**_jsonable(asdict(config)), "ultralytics": _jsonable(ul_args)},
        "dataset": data.summary(), "model": config.model, "device": device, "batch": decision.summary(),
        "nbs": config.overrides.get("nbs", batching.NBS), "augmentations": pipeline.record(),
        "versions": yolo.versions(),
        "events": [],
    })
    started = time.time()
    _supervise(recorder, run_dir, lambda: stepdown.train(ul_args, run_dir, recorder, config.batch_candidates, echo))
    echo(f"run {run_dir} completed in {time.time() - started:.0f} s")
    return run_dir


def resume(config: TrainConfig, echo=print) -> Path:
    """Continue the run in config.resume from its last completed epoch."""
    run_dir = Path(config.resume).expanduser().resolve()
    recorder = Recorder(run_dir)
    if not (run_dir / "run.json").is_file():
        raise RunDirError(f"{run_dir} is not a detector run (no run.json); pass a folder under runs/")
    last = run_dir / "weights" / "last.pt"
    if not last.is_file():
        raise RunDirError(f"{run_dir} has no weights/last.pt (stopped before its first epoch ended); start a new run")
    state = recorder.read()
    if state.get("status") == "completed":
        raise RunDirError(f"run {run_dir} already completed; start a new run to train further")
    if config.augment is not None:  # Ultralytics restores the pipeline from last.pt's args
        raise UsageError(f"--augment cannot change a resumed run; {run_dir} continues with the pipeline in its run.json")
    _refuse_resume_options(config, run_dir)
    ul_args = {}
    if config.device is not None:
        ul_args["device"] = config.device
    if batching.parse_batch(config.batch) != "auto":  # e.g. after an out-of-memory error no candidate survived
        ul_args["batch"] = int(config.batch)
    recorder.update(status="running", finished=None, error=None, pid=os.getpid(), host=platform.node(),
                    resumed=[*state.get("resumed", []), {"command": list(config.command) or sys.argv}])
    echo(f"resuming {run_dir} from {last}")
    candidates = (state.get("config") or {}).get("batch_candidates") or batching.DEFAULT_CANDIDATES
    _supervise(recorder, run_dir, lambda: stepdown.resume(last, ul_args, run_dir, recorder, candidates, echo))
    return run_dir


# Options a resume cannot change: Ultralytics restores them from last.pt (only device and batch may differ).
_FIXED_ON_RESUME = {"data": "--data", "model": "--model", "epochs": "--epochs", "imgsz": "--imgsz",
                    "workers": "--workers", "seed": "--seed", "name": "--name", "project": "--project",
                    "overrides": "KEY=VALUE", "batch_candidates": "--batch-candidates", "batch_safety": "--batch-safety"}


def _refuse_resume_options(config: TrainConfig, run_dir: Path) -> None:
    """A resumed run continues with its own settings: say so instead of ignoring an option."""
    defaults = TrainConfig()
    changed = [flag for key, flag in _FIXED_ON_RESUME.items() if getattr(config, key) != getattr(defaults, key)]
    if changed:
        raise UsageError(f"{changed[0]} cannot change a resumed run; {run_dir} continues with the settings in its "
                         "run.json (only --device and --batch may be given with --resume)")


def _jsonable(obj):
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    return obj
