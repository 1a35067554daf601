"""Pre-flight checks against Ultralytics: model specs, training keys, versions, the device."""

from __future__ import annotations

import platform
from pathlib import Path

import torch
import yaml
from ultralytics.cfg import DEFAULT_CFG_DICT, check_cfg
from ultralytics.nn.tasks import guess_model_task, yaml_model_load

from detector.errors import ModelError, UsageError
from detector.yolo import fastload
from detector.yolo.inference import load_model


TRAIN_KEYS = frozenset(DEFAULT_CFG_DICT)
# Options the CLI owns; passing them as key=value would bypass its checks.
CLI_OWNED = frozenset({"data", "model", "epochs", "imgsz", "batch", "device", "workers", "seed", "name", "project",
                       "resume", "mode", "task", "exist_ok", "save_dir"})
NOT_OPTIONS = frozenset({"mode", "task", "exist_ok", "save_dir", "cfg"})  # owned keys no option sets


def check_overrides(overrides: dict) -> None:
    """Refuse unknown Ultralytics training keys and keys that have their own option.

    `loader` (fast or ultralytics) is detector's own key: the trainer takes it out before Ultralytics sees the rest.
    """
    if "loader" in overrides:
        fastload.check_loader(overrides["loader"])
    unknown = sorted(set(overrides) - TRAIN_KEYS - {"loader"})
    if unknown:
        raise UsageError(f"unknown training argument {unknown[0]!r}; see 'detector train --help' for key=value options")
    owned = sorted(set(overrides) & CLI_OWNED)
    if owned:
        raise UsageError(f"set {owned[0]!r} with its own option (--{owned[0].replace('_', '-')}), not as key=value")
    # Ultralytics' own type and range check, before anything runs or is written (it edits what it checks);
    # detector checks `loader` and `amp` itself, with its own words.
    try:
        check_cfg({k: v for k, v in overrides.items() if k not in ("loader", "amp")}, hard=True)
    except (TypeError, ValueError) as e:
        raise UsageError(str(e)) from e


def training_loader(overrides: dict) -> str:
    """Which training loader the overrides ask for: detector's fast one unless loader=ultralytics."""
    return fastload.check_loader(overrides.get("loader") or fastload.DEFAULT)


def expand_cfg(overrides: dict) -> dict:
    """The overrides with a `cfg=FILE` replaced by the training arguments in FILE (explicit KEY=VALUE wins).

    Ultralytics would honour save_dir, resume, project and name from such a file and so
    write into another run's folder; here the file is only a set of training arguments:
    the keys the CLI owns may appear in it with Ultralytics' default value (as in an
    args.yaml) and are then ignored, and any other value of them is refused.
    """
    if overrides.get("cfg") is None:
        return {k: v for k, v in overrides.items() if k != "cfg"}
    path = Path(str(overrides["cfg"])).expanduser()
    try:
        loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise UsageError(f"cfg file {path} cannot be read ({type(e).__name__}); pass a YAML file of training "
                         "arguments") from None
    if not isinstance(loaded, dict):
        raise UsageError(f"cfg file {path} is not a mapping of training arguments (key: value lines)")
    owned = sorted(k for k in set(loaded) & (CLI_OWNED | {"cfg"}) if loaded[k] != DEFAULT_CFG_DICT.get(k))
    if owned:
        key = owned[0]
        raise UsageError(f"cfg file {path} sets {key}: {loaded[key]!r}, which detector owns (the run folder and "
                         f"the settings with their own option); remove it from the file"
                         + (f" or pass --{key.replace('_', '-')}" if key not in NOT_OPTIONS else ""))
    mine = {k: v for k, v in loaded.items() if k not in CLI_OWNED and k != "cfg"}
    return {**mine, **{k: v for k, v in overrides.items() if k != "cfg"}}


def check_model(model: str) -> str:
    """Return a model spec Ultralytics can load offline: a built-in/local YAML or a local .pt."""
    p = Path(model).expanduser()
    hint = "nothing can be downloaded: use a model YAML such as yolo11n.yaml or a local .pt file"
    if p.suffix == ".pt":
        if not p.is_file():
            raise ModelError(f"weights file {model} not found; {hint}")
        load_model(p)  # a damaged or non-detection checkpoint is refused before any run folder exists
        return str(p.resolve())
    if p.suffix not in {".yaml", ".yml"}:
        raise ModelError(f"unknown model {model!r}; {hint}")
    spec = str(p.resolve()) if p.is_file() else model
    try:
        cfg = yaml_model_load(spec)  # a local file, or a name inside the installed ultralytics/cfg/models
    except (FileNotFoundError, OSError):
        raise ModelError(f"unknown model {model!r}: no such local file or built-in YAML; {hint}") from None
    except Exception:  # not YAML at all
        raise ModelError(f"model YAML {model} cannot be read as an Ultralytics model definition") from None
    try:
        task = guess_model_task(cfg)  # from the head module, not the file name
    except Exception:
        raise ModelError(f"model YAML {model} cannot be read as an Ultralytics model definition") from None
    if task != "detect":
        raise ModelError(f"model {model} is a {task} model; detector trains detection models (e.g. yolo11n.yaml)")
    return spec


def versions() -> dict:
    """Versions of the libraries a run depends on, for run.json."""
    import albumentations
    import ultralytics

    from detector import __version__

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "ultralytics": ultralytics.__version__,
        "albumentations": albumentations.__version__,
        "detector": __version__,
    }


def device_info(device: str | None) -> dict:
    """Name and memory of the device a run will use: CPU, or the first (smallest) CUDA device named."""
    if device in (None, "", "cpu") and not (device is None and torch.cuda.is_available()):
        return {"type": "cpu", "name": "cpu", "total_memory_gb": None}
    if not torch.cuda.is_available():
        raise UsageError(f"--device {device} asks for a GPU but PyTorch sees no CUDA device; use --device cpu")
    ids = [int(x) for x in str(device or "0").replace("cuda:", "").split(",") if x.strip()]
    props = [torch.cuda.get_device_properties(i) for i in ids]
    smallest = min(props, key=lambda p: p.total_memory)
    return {"type": "cuda", "name": smallest.name, "count": len(ids),
            "total_memory_gb": round(smallest.total_memory / 2**30, 2)}


def default_train_arg(key: str):
    """Ultralytics' default for a training argument (lr0, optimizer, nbs, ...), as the trainer would use it."""
    return DEFAULT_CFG_DICT.get(key)

