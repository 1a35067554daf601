"""The hermetic runtime: environment set before Ultralytics or Albumentations is imported.

Ultralytics, left alone, checks connectivity, downloads fonts and weights, sends
telemetry, installs missing packages with pip and checks for updates. The tool
owns a private Ultralytics config directory (never the user's own settings) and
switches all of that off there. `prepare()` must run before the first import of
ultralytics or albumentations; `detector.yolo` calls it at import time.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from detector import fileio

# Values Ultralytics and Albumentations read from the environment at import time.
OFFLINE_ENV = {
    "YOLO_OFFLINE": "1",  # utils.is_online() returns False without a DNS lookup
    "YOLO_AUTOINSTALL": "0",  # check_requirements never runs pip
    "YOLO_VERBOSE": "1",
    "NO_ALBUMENTATIONS_UPDATE": "1",  # no version check against PyPI on import
    # onnxruntime's native telemetry threads resolve Microsoft's events host when a session is created
    # (disable_telemetry_events() does not stop them); read by the library when it loads.
    "ORT_DISABLE_TELEMETRY": "1",
}

# Settings Ultralytics reads from $YOLO_CONFIG_DIR/Ultralytics/settings.json.
OFFLINE_SETTINGS = {
    "sync": False,  # no telemetry events
    "api_key": "",
    "clearml": False,
    "comet": False,
    "dvc": False,
    "mlflow": False,
    "raytune": False,
    "tensorboard": False,
    "wandb": False,
    "vscode_msg": False,
    "openvino_msg": False,
}


def home() -> Path:
    """The tool's own folder: $DETECTOR_HOME, else $XDG_CACHE_HOME/detector, else ~/.cache/detector."""
    if env := os.environ.get("DETECTOR_HOME"):
        return Path(env).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")).expanduser() / "detector"


def datasets_cache() -> Path:
    """Where generated datasets and resolved data YAMLs are cached."""
    return home() / "datasets"


def _write_settings(ul_dir: Path) -> None:
    """Merge our offline settings into the private settings file, keeping anything else Ultralytics wrote."""
    path = ul_dir / "settings.json"
    current: dict = {}
    if path.exists():
        try:
            current = json.loads(path.read_text())
        except (OSError, ValueError):
            current = {}
    wanted = {
        # The rest of Ultralytics 8.4's schema (settings_version 0.0.8), so its first import does
        # not warn that the file is outdated and rewrite it; values already there are kept.
        "settings_version": "0.0.8", "uuid": "", "openai_api_key": "",
        **current,
        **OFFLINE_SETTINGS,
        "datasets_dir": str(datasets_cache()),
        "weights_dir": str(home() / "weights"),
        "runs_dir": str(home() / "ultralytics-runs"),
    }
    if wanted != current:
        fileio.write_text(path, json.dumps(wanted, indent=2))  # parallel processes each write their own temp


def _install_font(ul_dir: Path) -> None:
    """Give Ultralytics an Arial.ttf so its plotting never downloads one (DejaVu Sans from matplotlib)."""
    target = ul_dir / "Arial.ttf"
    if target.exists():
        return
    import matplotlib

    source = Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans.ttf"
    fileio.copy_file(source, target)


def prepare() -> Path:
    """Set the offline environment and the private Ultralytics config dir; return that dir.

    Idempotent. Respects a YOLO_CONFIG_DIR the caller set explicitly only if it
    already points at our folder; otherwise ours wins, so the user's own
    Ultralytics settings are never read or rewritten by the tool.
    """
    config_dir = home() / "ultralytics"
    ul_dir = config_dir / "Ultralytics"
    ul_dir.mkdir(parents=True, exist_ok=True)
    os.environ.update(OFFLINE_ENV)
    os.environ["YOLO_CONFIG_DIR"] = str(config_dir)
    _write_settings(ul_dir)
    _install_font(ul_dir)
    return ul_dir
