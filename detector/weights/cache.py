"""The weights cache: Ultralytics asset names (yolo11n.pt, ...) resolved to local files, fetched only on request.

A bare `NAME.pt` that is not a file in the current folder is an asset name. It
is looked up in $DETECTOR_HOME/weights (default ~/.cache/detector/weights).
Found: used, no network. Missing: one line naming the file, the folder and
--download; with --download (or DETECTOR_DOWNLOAD=1) it is fetched once from
Ultralytics' release assets, or from $DETECTOR_WEIGHTS_URL/NAME. Beside each
file a NAME.json says where it came from, so run.json can record its URL.
"""

from __future__ import annotations

import logging
import hashlib
import json
import os
from datetime import datetime, timezone
from pathlib import Path

from detector import fileio, runtime
from detector.weights.fetch import ProgressBar, WeightsError, download

log = logging.getLogger(__name__)

# Where Ultralytics 8.4 publishes its weights (ultralytics.utils.downloads.attempt_download_asset).
ULTRALYTICS_ASSETS = "https://github.com/ultralytics/assets/releases/download/v8.4.0"
# Asset suffixes of models that are not detectors: refused before anything is downloaded.
NOT_DETECTION = ("-cls", "-seg", "-pose", "-obb", "-sem", "-depth", "-world", "-worldv2")


def cache_dir() -> Path:
    """$DETECTOR_HOME/weights."""
    return runtime.home() / "weights"


def base_url() -> str:
    """Ultralytics' release assets, or the mirror DETECTOR_WEIGHTS_URL names."""
    return (os.environ.get("DETECTOR_WEIGHTS_URL") or ULTRALYTICS_ASSETS).rstrip("/")


def download_allowed(flag: bool = False) -> bool:
    """--download, or DETECTOR_DOWNLOAD=1 (for sweeps and scripts)."""
    return flag or os.environ.get("DETECTOR_DOWNLOAD", "").strip().lower() in {"1", "true", "yes"}


def is_asset_name(model: str) -> bool:
    """A bare NAME.pt (no folder) that is not a file here: meant as a cached or downloadable asset."""
    p = Path(model)
    return p.suffix == ".pt" and p.name == model and not p.exists()


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".json")


def origin(path: Path) -> dict:
    """What the cache knows of a file: the URL it came from and when (empty for a file copied in by hand)."""
    try:
        return json.loads(_sidecar(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def fetch(name: str, progress=None) -> dict:
    """Download NAME into the cache (replacing nothing until complete); return its source record."""
    _check_name(name)
    url = f"{base_url()}/{name}"
    log.info(f"Downloading {name} from {url} into {cache_dir()}")
    got = download(url, cache_dir() / name, progress or ProgressBar(name))
    record = {"name": name, "url": got.url, "size": got.size, "sha256": got.sha256,
              "fetched": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    fileio.write_json(_sidecar(got.path), record)
    return {**record, "path": str(got.path), "downloaded": True}


def _check_name(name: str) -> None:
    """A weights name is a plain file name NAME.pt: no folder, and a stem that is not empty nor hidden."""
    stem = name[: -len(".pt")] if name.endswith(".pt") else ""
    if Path(name).name != name or "\\" in name or not stem or stem.startswith(".") or not stem.strip():
        raise WeightsError(f"{name!r} is not a weights name; pass a file name such as yolo11n.pt")
    if Path(name).stem.endswith(NOT_DETECTION):
        raise WeightsError(f"{name} is not a detection model; detector trains detectors (e.g. yolo11n.pt)")


def resolve(model: str, download_flag: bool = False) -> dict | None:
    """The starting weights' record {name, path, url, sha256, size, downloaded} for a .pt model; None for a YAML.

    An asset name comes from the cache, or is downloaded when allowed; a local
    .pt is recorded as it is. Raises WeightsError (one line) otherwise.
    """
    if not str(model).endswith(".pt"):
        return None
    if not is_asset_name(model):
        path = Path(model).expanduser()
        if not path.is_file():
            return None  # the model check says it is missing, as for any file
        return {"name": path.name, "path": str(path.resolve()), "url": None, "sha256": sha256(path),
                "size": path.stat().st_size, "downloaded": False}
    _check_name(model)
    cached = cache_dir() / model
    if cached.is_file():
        known = origin(cached)
        return {"name": model, "path": str(cached), "url": known.get("url"), "sha256": sha256(cached),
                "size": cached.stat().st_size, "downloaded": False}
    if not download_allowed(download_flag):
        raise WeightsError(f"{model} is not in the weights cache {cache_dir()}; fetch it once with --download "
                           f"(or DETECTOR_DOWNLOAD=1, or 'detector weights fetch {model}'), or copy it there")
    return fetch(model)


def fetch_once(name: str, force: bool = False) -> dict:
    """`detector weights fetch`: the cached record, or a download when missing (or forced)."""
    _check_name(name)
    if not force and (cache_dir() / name).is_file():
        return resolve(name)
    return fetch(name)


def listing() -> list[dict]:
    """Every .pt in the cache with its size, sha256 and source URL, by name."""
    folder = cache_dir()
    if not folder.is_dir():
        return []
    out = []
    for path in sorted(p for p in folder.glob("*.pt") if not p.name.startswith(".")):  # temporaries, old strays
        known = origin(path)
        out.append({"name": path.name, "path": str(path), "size": path.stat().st_size,
                    "sha256": sha256(path), "url": known.get("url"),
                    "fetched": known.get("fetched")})
    return out
