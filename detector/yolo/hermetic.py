"""Ultralytics patched for the hermetic runtime: no weights download for its AMP check, no writes into datasets
(label caches and cache=disk image files go to the tool's folder)."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import torch
from ultralytics.data import base as _ul_base
from ultralytics.data import dataset as _ul_dataset
from ultralytics.engine import trainer as _ul_trainer
from ultralytics.utils import LOGGER

from detector import runtime


# GPUs Ultralytics' own AMP check rejects by name (its check_amp, 8.4).
_AMP_BAD_GPUS = re.compile(r"(nvidia|geforce|quadro|tesla).*?(1660|1650|1630|t400|t550|t600|t1000|t1200|t2000|k40m)", re.I)


def offline_check_amp(model) -> bool:
    """Ultralytics' AMP check without its yolo26n.pt download: same GPU blocklist, no weights needed."""
    device = next(model.parameters()).device
    if device.type != "cuda":
        return False
    ok = not _AMP_BAD_GPUS.search(torch.cuda.get_device_name(device))
    LOGGER.info(f"AMP: offline check {'passed' if ok else 'failed, AMP disabled'} (no download)")
    return ok


_ul_trainer.check_amp = offline_check_amp  # the trainer calls it by this module-level name


# Ultralytics saves a label cache (labels/<split>.cache) beside the user's labels, writing into the
# dataset folder even when it is shared or meant read-only (as root every folder is writable). The
# tool keeps that cache in its own folder instead, keyed by the path Ultralytics would have used.
def _label_cache(path) -> Path:
    key = hashlib.sha1(str(Path(path).resolve()).encode()).hexdigest()[:16]
    folder = runtime.home() / "label-caches"
    folder.mkdir(parents=True, exist_ok=True)
    return folder / f"{Path(path).stem}-{key}.cache"


_load_cache, _save_cache = _ul_dataset.load_dataset_cache_file, _ul_dataset.save_dataset_cache_file
_ul_dataset.load_dataset_cache_file = lambda path: _load_cache(_label_cache(path))
_ul_dataset.save_dataset_cache_file = lambda prefix, path, x, version: _save_cache(prefix, _label_cache(path), x,
                                                                                    version)


# cache=disk makes Ultralytics save IMAGE.npy beside every image, into the dataset. Those files go to the
# tool's folder too, one subfolder per image folder; the check of free space runs just before they are written.
def _image_cache(image) -> Path:
    folder = Path(image).resolve().parent
    key = hashlib.sha1(str(folder).encode("utf-8", "surrogateescape")).hexdigest()[:16]
    out = runtime.home() / "image-caches" / f"{folder.name}-{key}"
    out.mkdir(parents=True, exist_ok=True)
    return out / f"{Path(image).stem}.npy"


_check_cache_disk = _ul_base.BaseDataset.check_cache_disk


def _check_cache_disk_in_tool_folder(self, *args, **kwargs) -> bool:
    self.npy_files = [_image_cache(f) for f in self.im_files]
    return _check_cache_disk(self, *args, **kwargs)


_ul_base.BaseDataset.check_cache_disk = _check_cache_disk_in_tool_folder
