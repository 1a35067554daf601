"""Frozen options of one training, declared once, parsed and validated once, passed down unchanged.

Every command-line option of a training is a field of TrainConfig or BatchOptions
declared with `option(...)`: its flag, help and default live here and nowhere
else. detector.options turns these declarations into Click options for every
command, and `TrainConfig.to_argv()` / `from_record()` turn a config into the
command line that makes it again (resume, sweeps, the report's commands).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import yaml

from detector.errors import UsageError

DEFAULT_MODEL = "yolo11n.yaml"
DEFAULT_CANDIDATES = (16, 32, 64)
# Share of a GPU's total memory the measured peak may use. The probe measures the real
# step, so it can aim far higher than AutoBatch's 60% extrapolation; the 15% left over
# covers what a short probe cannot see (docs/batch-size.md: fragmentation over a long
# run, cuDNN workspaces picked later, the CUDA context, a desktop or another process).
DEFAULT_SAFETY = 0.85

# The built-in dataset's demo settings, used when --data is not given and the user
# did not set the option. Measured on the 2-core CPU (docs/benchmarks.md):
# nbs=16 makes every batch-16 iteration a weight update (4x the updates of
# Ultralytics' nbs=64 on 400 images), and AdamW at 0.002 beat SGD at 0.02
# (mAP50 0.94 vs 0.65 after 20 epochs); mosaic off suits 128-px images.
BUILTIN_DEFAULTS = {"epochs": 20, "imgsz": 128}
# The training options `detector sweep` takes and gives to each of its runs (besides the batch and seed it sets).
SWEEP_OPTIONS = ("data", "model", "epochs", "imgsz", "device", "workers", "augment", "grad_stats", "tensorboard",
                 "mlflow", "overrides")
BUILTIN_OVERRIDES = {"nbs": 16, "optimizer": "AdamW", "lr0": 0.002, "warmup_epochs": 1, "mosaic": 0.0}


def option(default, flag: str, help: str, **click_kw):
    """A dataclass field that is also a command-line option: flag, help and Click settings in its metadata.

    click_kw: type, metavar, show_default, is_flag; `negate=True` for a flag that sets the field to False
    (--no-grad-stats); `text` for how the default is shown in help when it is not a plain value.
    """
    return field(default=default, metadata={"flag": flag, "help": help, **click_kw})


def parse_list(text, option: str, cast=int, minimum=1, as_set: bool = False, unit: str = "",
               what: str = "whole numbers", example: str = "16,32,64") -> tuple:
    """One rule for every comma list: 'a,b,c' (or a sequence) to a tuple of values >= minimum.

    as_set: the list names a set (candidate batches, GPU sizes): sorted, repeats merged.
    Otherwise it names things to do in order (runs of a sweep): order kept, a repeat refused.
    unit: a suffix allowed after each value (GB).
    """
    items = text.split(",") if isinstance(text, str) else list(text)
    try:
        values = [cast(str(v).strip().lower().removesuffix(unit.lower()).strip()) for v in items]
    except ValueError:
        values = []
    if not values or any(not (v >= minimum) or v == float("inf") for v in values):
        raise UsageError(f"{option} takes {what} separated by commas, such as {example}, not {text!r}")
    if as_set:
        return tuple(sorted(set(values)))
    if len(set(values)) != len(values):
        raise UsageError(f"{option} lists a value twice: {text!r}")
    return tuple(values)


def parse_batch(value: str | int) -> str | int:
    """'auto' or a positive integer; anything else is a usage error."""
    text = str(value).strip().lower()
    if text == "auto":
        return "auto"
    if text.isdigit() and int(text) > 0:
        return int(text)
    raise UsageError(f"--batch must be 'auto' or a positive integer, not {value!r}")


def parse_candidates(value) -> tuple[int, ...]:
    """'16,32,64' (or a sequence) to sorted, distinct positive batch sizes; anything else is a usage error."""
    return parse_list(value, "--batch-candidates", as_set=True, what="positive batch sizes")


def check_safety(fraction: float) -> float:
    """The --batch-safety fraction, refused outside (0, 1]."""
    if not 0 < fraction <= 1:
        raise UsageError(f"--batch-safety is a fraction of GPU memory in (0, 1] such as {DEFAULT_SAFETY}, not {fraction}")
    return fraction


@dataclass(frozen=True)
class BatchOptions:
    """--batch, --batch-candidates and --batch-safety, validated: build with BatchOptions.parse."""

    requested: str | int = option(
        "auto", "--batch", "Images per iteration: 'auto' (GPU: largest candidate that fits; CPU: 16) or an integer.",
        show_default=True)
    candidates: tuple[int, ...] = option(
        DEFAULT_CANDIDATES, "--batch-candidates",
        "Batch sizes --batch auto chooses from on a GPU, and steps down through after out-of-memory.",
        show_default=True, text=",".join(map(str, DEFAULT_CANDIDATES)))
    safety: float = option(
        DEFAULT_SAFETY, "--batch-safety",
        "Share of GPU memory the peak of --batch auto may use (see 'detector batch --help').",
        type=float, show_default=True)

    @classmethod
    def parse(cls, batch="auto", candidates=DEFAULT_CANDIDATES, safety: float = DEFAULT_SAFETY) -> "BatchOptions":
        return cls(parse_batch(batch), parse_candidates(candidates), check_safety(float(safety)))

    @property
    def auto(self) -> bool:
        return self.requested == "auto"


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


def override_text(key: str, value) -> str:
    """KEY=VALUE that parse_overrides reads back as exactly value."""
    if value is None:
        return f"{key}="
    if isinstance(value, str):
        try:
            same = yaml.safe_load(value) == value
        except yaml.YAMLError:
            same = False
        return f"{key}={value if same else json.dumps(value)}"
    return f"{key}={json.dumps(value)}"


@dataclass(frozen=True)
class TrainConfig:
    """Every option of one training, resolved by the CLI and passed down unchanged."""

    data: Path | None = option(None, "--data", "YOLO data YAML. Default: the built-in shapes dataset (generated once, cached).",
                               path=True)
    model: str = option(DEFAULT_MODEL, "--model", "Model YAML name (yolo11n.yaml, yolov8s.yaml, ...), a local .pt file, "
                        "or pretrained weights by name (yolo11n.pt) from the weights cache.", show_default=True)
    epochs: int | None = option(None, "--epochs", "Epochs. Default 100; 20 on the built-in dataset.", type=int)
    imgsz: int | None = option(None, "--imgsz", "Training image size. Default 640; 128 on the built-in dataset.", type=int)
    imgsz_requested: int | None = None  # set when --imgsz was rounded up to the stride (imgsz is what trains)
    batch: BatchOptions = BatchOptions()
    device: str | None = option(None, "--device", "cpu, 0, or 0,1 for two GPUs. Default: GPU 0 if present, else CPU.")
    workers: int = option(8, "--workers", "Data loader worker processes (CPU training uses 0).", type=int,
                          show_default=True)
    seed: int = option(0, "--seed", "Random seed.", type=int, show_default=True)
    name: str | None = option(None, "--name", "Run folder name under --project. Default: train-<date>-<time>.")
    project: Path = option(Path("runs"), "--project", "Folder that holds run folders.", path=True, show_default=True)
    resume: Path | None = option(None, "--resume", "Continue an interrupted run from its last completed epoch, "
                                 "appending to its record.", path=True, metavar="RUN_DIR")
    overrides: dict = field(default_factory=dict)  # other Ultralytics training arguments: KEY=VALUE words
    augment: str | None = option(None, "--augment", "Albumentations pipeline (a file A.save wrote, YAML or JSON) or "
                                 "preset: none, ultralytics, light, heavy. Default: Ultralytics' own set.",
                                 metavar="FILE|PRESET")
    command: tuple = ()
    sweep: dict | None = None  # set by `detector sweep`: its name, semantics and lr rule, recorded in run.json config
    grad_stats: bool = option(True, "--no-grad-stats", "Do not measure the gradient noise scale (epochs.csv grad_* "
                              "columns stay empty).", negate=True)
    tensorboard: bool = option(False, "--tensorboard", "Also write TensorBoard event files to PROJECT/NAME/tensorboard/ "
                               "(needs detector[tensorboard]).", is_flag=True)
    mlflow: str | None = option(None, "--mlflow", "Also log params, every iteration's and epoch's metrics and the run "
                                "folder's files to this MLflow tracking URI (http://HOST:PORT, sqlite:///mlflow.db, a "
                                "folder); needs detector[mlflow].", metavar="URI")
    download: bool = option(False, "--download", "Fetch pretrained weights missing from the cache (once; also "
                            "DETECTOR_DOWNLOAD=1). Nothing else is ever downloaded.", is_flag=True)
    weights: dict | None = None  # set by preflight for a .pt model: its path, source URL and sha256

    @property
    def nbs(self) -> int:
        from detector import facts

        return int(self.overrides.get("nbs", facts.NBS))

    def record(self) -> dict:
        """The config as run.json's `config` records it (batch options as flat keys, paths as strings)."""
        out = {k: v for k, v in asdict(self).items() if k != "batch"}
        out.update(batch=self.batch.requested, batch_candidates=list(self.batch.candidates),
                   batch_safety=self.batch.safety)
        return jsonable(out)

    @classmethod
    def from_record(cls, rec: dict) -> "TrainConfig":
        """The config a run.json `config` (as record() wrote it) describes; unknown keys are ignored."""
        kw = {}
        for f in fields(cls):
            if f.name in rec and f.name != "batch":
                value = rec[f.name]
                if f.metadata.get("path") and value is not None:
                    value = Path(value)
                kw[f.name] = tuple(value) if f.name == "command" else value
        kw["overrides"] = dict(rec.get("overrides") or {})
        batch = BatchOptions()
        kw["batch"] = BatchOptions(rec.get("batch", batch.requested),
                                   tuple(rec.get("batch_candidates") or batch.candidates),
                                   float(rec.get("batch_safety", batch.safety)))
        return cls(**kw)

    def to_argv(self, only=None, skip=()) -> list[str]:
        """The `detector train` words that make this config: each option that differs from its default, then KEY=VALUE.

        only / skip: field names to keep or leave out (a sweep passes on only the options its runs share).
        """
        words = []
        for name, f, value in _declared(self):
            if (only is not None and name not in only) or name in skip or value == f.default:
                continue
            if f.metadata.get("negate") or f.metadata.get("is_flag"):
                words.append(f.metadata["flag"])
            else:
                text = ",".join(map(str, value)) if isinstance(value, tuple) else str(value)
                words += [f.metadata["flag"], text]
        if (only is None or "overrides" in only) and "overrides" not in skip:
            words += [override_text(k, v) for k, v in self.overrides.items()]
        return words


def _declared(config: TrainConfig):
    """(name, field, value) of every option field of config, the batch options included, in declaration order."""
    for f in fields(config):
        value = getattr(config, f.name)
        if isinstance(value, BatchOptions):
            for bf in fields(value):
                yield f"batch.{bf.name}", bf, getattr(value, bf.name)
        elif "flag" in f.metadata:
            yield f.name, f, value


def declared_options() -> dict:
    """Option name (TrainConfig field, or batch.<field>) -> its dataclass field, in declaration order."""
    return {name: f for name, f, _ in _declared(TrainConfig())}


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


def with_builtin_defaults(config: TrainConfig) -> TrainConfig:
    """config with the built-in demo's settings filled in where the user left them unset (no --data only)."""
    if config.data is not None:
        return config
    return replace(
        config,
        epochs=config.epochs if config.epochs is not None else BUILTIN_DEFAULTS["epochs"],
        imgsz=config.imgsz if config.imgsz is not None else BUILTIN_DEFAULTS["imgsz"],
        overrides={**BUILTIN_OVERRIDES, **config.overrides},
    )


def jsonable(obj):
    """Paths as strings and tuples as lists, recursively, for JSON files."""
    if isinstance(obj, dict):
        return {k: jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    return obj
