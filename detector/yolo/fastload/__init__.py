"""detector's training loader: Ultralytics' augmentation distribution at a lower cost per image.

- geometry: mosaic layout, random affine and box filtering, drawn exactly as Ultralytics draws them
- pipeline: FastTrainPipeline, the per-sample work (tiles resized straight into the output, HSV, flips, format)
- dataset: FastYOLODataset (Ultralytics' YOLODataset with that pipeline, reduced-scale JPEG decoding, whole batches)
- cache: DecodedCache, the decoded training-scale images in RAM under a memory cap, shared by the workers

`loader=ultralytics` (KEY=VALUE) trains with Ultralytics' own pipeline instead.
"""

from __future__ import annotations

import os

LOADERS = ("fast", "ultralytics")
DEFAULT = "fast"
MAX_WORKERS = 16
DEFAULT_WORKERS = 8  # --workers' default, Ultralytics' own


def usable_cores() -> int:
    """The cores this process may run on (taskset and cgroup CPU sets respected, unlike os.cpu_count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def choose_workers(requested: int, command: list[str] | tuple = ()) -> int:
    """Loader workers for GPU training: what the user set (command: the argv), else one per usable core (at most 16).

    Ultralytics starts min(workers, os.cpu_count() // GPUs) workers, which ignores the CPU set a
    container or taskset grants (8 workers on 2 usable cores), and trains on CPU with 0 whatever is
    asked (it still does: CPU training keeps 0). On the 2-vCPU machines most users train on (Colab,
    Kaggle T4) this gives 2, as Ultralytics would; on a machine with more cores, all of them feed the GPU.
    """
    user_set = requested != DEFAULT_WORKERS or any(a == "--workers" or a.startswith("--workers=") for a in command)
    if user_set:  # --workers given (or a value other than the default, from the Python API)
        return requested
    return max(1, min(usable_cores(), MAX_WORKERS))


def check_loader(name) -> str:
    """The loader name, or UsageError naming the choices."""
    from detector.errors import UsageError

    if name not in LOADERS:
        raise UsageError(f"loader={name!r} is not a loader; use loader=fast (the default) or loader=ultralytics")
    return name


def build_dataset(cfg, img_path, batch: int, data: dict, mode: str = "train", rect: bool = False, stride: int = 32,
                  loader: str = DEFAULT):
    """The dataset Ultralytics' build_yolo_dataset would build, with detector's pipeline for training when asked.

    Validation (mode != "train") and any task other than plain detection stay Ultralytics' own.
    """
    from ultralytics.data import build_yolo_dataset
    from ultralytics.utils import colorstr

    if loader == "ultralytics" or mode != "train" or cfg.task != "detect" or data.get("complete"):
        return build_yolo_dataset(cfg, img_path, batch, data, mode=mode, rect=rect, stride=stride)
    from ultralytics.data.utils import get_split_fraction

    from detector.yolo.fastload.dataset import FastYOLODataset

    return FastYOLODataset(
        img_path=img_path, imgsz=cfg.imgsz, batch_size=batch, augment=True, hyp=cfg, rect=cfg.rect or rect,
        cache=cfg.cache or None, single_cls=cfg.single_cls or False, stride=stride, pad=0.0,
        prefix=colorstr("train: "), task=cfg.task, classes=cfg.classes, data=data,
        fraction=get_split_fraction(cfg.fraction, "train"))
