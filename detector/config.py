"""Frozen options of one training, parsed and validated once by the CLI and passed down unchanged."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import yaml

from detector.errors import UsageError

DEFAULT_CANDIDATES = (16, 32, 64)
# Share of a GPU's total memory the measured peak may use. The probe measures the real
# step, so it can aim far higher than AutoBatch's 60% extrapolation; the 15% left over
# covers what a short probe cannot see (README, "Batch size": fragmentation over a long
# run, cuDNN workspaces picked later, the CUDA context, a desktop or another process).
DEFAULT_SAFETY = 0.85

# The built-in dataset's demo settings, used when --data is not given and the user
# did not set the option. Measured on the 2-core CPU (README, "Performance"):
# nbs=16 makes every batch-16 iteration a weight update (4x the updates of
# Ultralytics' nbs=64 on 400 images), and AdamW at 0.002 beat SGD at 0.02
# (mAP50 0.94 vs 0.65 after 20 epochs); mosaic off suits 128-px images.
BUILTIN_DEFAULTS = {"epochs": 20, "imgsz": 128}
BUILTIN_OVERRIDES = {"nbs": 16, "optimizer": "AdamW", "lr0": 0.002, "warmup_epochs": 1, "mosaic": 0.0}


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
    items = value.split(",") if isinstance(value, str) else list(value)
    try:
        out = sorted({int(str(v).strip()) for v in items if str(v).strip()})
    except ValueError:
        out = []
    if not out or out[0] < 1:
        raise UsageError(f"--batch-candidates must list positive integers such as 16,32,64, not {value!r}")
    return tuple(out)


def check_safety(fraction: float) -> float:
    """The --batch-safety fraction, refused outside (0, 1]."""
    if not 0 < fraction <= 1:
        raise UsageError(f"--batch-safety is a fraction of GPU memory in (0, 1] such as {DEFAULT_SAFETY}, not {fraction}")
    return fraction


@dataclass(frozen=True)
class BatchOptions:
    """--batch, --batch-candidates and --batch-safety, validated: build with BatchOptions.parse."""

    requested: str | int = "auto"  # 'auto' or a positive integer
    candidates: tuple[int, ...] = DEFAULT_CANDIDATES  # sorted, distinct
    safety: float = DEFAULT_SAFETY  # share of GPU memory the peak may use

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


@dataclass(frozen=True)
class TrainConfig:
    """Every option of one training, resolved by the CLI and passed down unchanged."""

    data: Path | None = None  # None: the built-in dataset
    model: str = "yolo11n.yaml"
    epochs: int | None = None  # None: 100, or the built-in demo's value
    imgsz: int | None = None  # None: 640, or the built-in demo's value
    imgsz_requested: int | None = None  # set when --imgsz was rounded up to the stride (imgsz is what trains)
    batch: BatchOptions = BatchOptions()
    device: str | None = None
    workers: int = 8
    seed: int = 0
    name: str | None = None
    project: Path = Path("runs")
    resume: Path | None = None
    overrides: dict = field(default_factory=dict)  # other Ultralytics training arguments
    augment: str | None = None  # Albumentations pipeline: preset name or A.save file; None: Ultralytics' default
    command: tuple = ()
    sweep: dict | None = None  # set by `detector sweep`: its name, semantics and lr rule, recorded in run.json config
    grad_stats: bool = True  # measure the gradient noise scale while training (--no-grad-stats turns it off)
    tensorboard: bool = False  # also write RUN/tensorboard/ event files from the CSV records
    download: bool = False  # --download: an asset name missing from the weights cache may be fetched
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
