"""Albumentations steps and the training loader (detector's fast one or Ultralytics'), as the trainer builds it."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import numpy as np
import torch
from ultralytics.cfg import DEFAULT_CFG
from ultralytics.utils import LOGGER, RANK

from detector.errors import AugmentError
from detector.yolo import fastload

# -- Albumentations pipelines and the training loader ------------------------------------------------------------------

def default_albumentations() -> list[dict]:
    """Ultralytics' own default Albumentations set, in A.to_dict form (what the `ultralytics` preset must equal)."""
    import albumentations as A
    from ultralytics.data.augment import Albumentations

    return [A.to_dict(t) for t in Albumentations(p=1.0, transforms=None).transform.transforms]


def albumentations_step(transforms: list[dict] | None):
    """Ultralytics' Albumentations step for a pipeline, as fn(image, boxes_xyxy, cls) -> (image, boxes_xyxy, cls).

    None if Ultralytics cannot build it (it then trains without it, logging why).
    """
    from ultralytics.data.augment import Albumentations
    from ultralytics.utils.instance import Instances


    with warnings.catch_warnings():  # A.from_dict warns about fields some classes' own to_dict writes (SafeRotate)
        warnings.simplefilter("ignore", UserWarning)
        step = Albumentations(p=1.0, transforms=None if transforms is None else list(transforms))
    if step.transform is None:
        return None

    def apply(image, boxes_xyxy, cls):
        labels = {
            "img": image, "cls": np.asarray(cls, dtype=np.float32).reshape(-1, 1),
            "instances": Instances(bboxes=np.asarray(boxes_xyxy, dtype=np.float32).reshape(-1, 4),
                                   segments=np.zeros((0, 1000, 2), dtype=np.float32), bbox_format="xyxy",
                                   normalized=False),
        }
        out = step(labels)
        h, w = out["img"].shape[:2]
        inst = out["instances"]
        inst.convert_bbox("xyxy")
        inst.denormalize(w, h)
        return out["img"], inst.bboxes.copy(), out["cls"].reshape(-1)

    return apply


def augment_sample(transforms: list[dict], image, boxes_xyxy, cls, seed: int = 0):
    """Run Ultralytics' Albumentations step on one image with pixel xyxy boxes; return (image, boxes_xyxy, cls)."""
    step = albumentations_step(transforms)
    if step is None:
        return None
    torch.manual_seed(seed)  # the step seeds Albumentations' own RNG from torch.initial_seed()
    return step(image, boxes_xyxy, cls)


def check_augmentations(transforms: list[dict], imgsz: int, source: str) -> None:
    """Dry-run a pipeline through Ultralytics' own Albumentations step; raise AugmentError if it cannot train."""
    said: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: said.append(record.getMessage())
    shown = LOGGER.handlers[:]  # the dry run's own log lines are kept for the error, not printed
    LOGGER.handlers[:] = [handler]
    try:
        image = np.random.default_rng(0).integers(0, 256, (imgsz, imgsz, 3), dtype=np.uint8)
        box = [imgsz * 0.3, imgsz * 0.35, imgsz * 0.7, imgsz * 0.65]
        for seed in range(3):
            out = augment_sample(transforms, image.copy(), [box], [0], seed=seed)
            if out is None:
                why = (said or ["unknown error"])[-1]
                raise AugmentError(f"{source}: Ultralytics cannot build this pipeline: {why}")
            if out[0].shape != (imgsz, imgsz, 3):
                raise AugmentError(f"{source}: the pipeline turns a {imgsz}x{imgsz} image into "
                                   f"{out[0].shape[1]}x{out[0].shape[0]}; every image of a batch must keep its size")
    except AugmentError:
        raise
    except Exception as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise AugmentError(f"{source}: the pipeline fails on a training sample: {type(e).__name__}: {first}") from None
    finally:
        LOGGER.handlers[:] = shown


class _SingleThreadCollate:
    """A dataset's collate_fn run with one PyTorch thread (a class, so worker processes can pickle it)."""

    def __init__(self, fn):
        self.fn = fn

    def __call__(self, batch):
        threads = torch.get_num_threads()
        if threads == 1:  # loader workers already run single-threaded
            return self.fn(batch)
        torch.set_num_threads(1)
        try:
            return self.fn(batch)
        finally:
            torch.set_num_threads(threads)


def single_thread_collate(dataset):
    """Make the loader stack a batch's images with one thread; return the dataset.

    With workers=0 (always, when Ultralytics trains on CPU) the batch is collated in
    the training process, whose PyTorch thread pool turns torch.stack of 16 640-px
    images into a multi-threaded copy: measured on the 2-core machine at 5.6-12 ms
    per image of wall time against 0.3-0.4 ms with one thread (docs/benchmarks.md,
    "Data loader"). Workers are single-threaded already, so they are unaffected.
    """
    dataset.collate_fn = _SingleThreadCollate(type(dataset).collate_fn)  # build_dataloader reads the attribute
    return dataset


def training_loader(data_yaml: Path, transforms: list[dict] | None, imgsz: int, batch: int, workers: int = 0,
                    seed: int = 0, overrides: dict | None = None, loader: str | None = None):
    """Ultralytics' training dataset and loader, built as DetectionTrainer builds them (augment on, shuffle on).

    transforms None keeps Ultralytics' default Albumentations set. Images are read from disk as batches
    need them; only `cache=ram`/`cache=disk` in overrides changes that. The collate is single-threaded as in
    training. loader (or `loader` in overrides) picks the pipeline as training does: detector's fast one by
    default, "ultralytics" for the stock one.
    """
    overrides = dict(overrides or {})
    asked = overrides.pop("loader", None)  # a KEY=VALUE of detector's, not of Ultralytics
    loader = fastload.check_loader(loader or asked or fastload.DEFAULT)
    from ultralytics.cfg import get_cfg
    from ultralytics.data import build_dataloader
    from ultralytics.data.utils import check_det_dataset
    from ultralytics.utils.torch_utils import init_seeds

    args = {**(overrides or {}), "data": str(data_yaml), "imgsz": imgsz, "batch": batch, "workers": workers,
            "seed": seed, "mode": "train"}
    if transforms is not None:
        args["augmentations"] = list(transforms)
    cfg = get_cfg(DEFAULT_CFG, args)
    data = check_det_dataset(str(data_yaml))
    init_seeds(cfg.seed + 1 + RANK, deterministic=cfg.deterministic)  # as BaseTrainer.__init__ seeds
    dataset = fastload.build_dataset(cfg, data["train"], batch, data, mode="train", stride=32, loader=loader)
    single_thread_collate(dataset)
    loader = build_dataloader(dataset, batch=batch, workers=workers, shuffle=True, rank=-1, device="cpu")
    return dataset, loader, data["names"]


def augmented_batch(data_yaml: Path, transforms: list[dict] | None, imgsz: int, batch: int, seed: int = 0,
                    overrides: dict | None = None) -> dict:
    """The first training batch as the trainer's loader yields it, as numpy: images HWC RGB uint8 and boxes."""
    _, loader, names = training_loader(data_yaml, transforms, imgsz, batch, workers=0, seed=seed, overrides=overrides)
    b = next(iter(loader))
    return {
        "images": b["img"].permute(0, 2, 3, 1).contiguous().numpy(),  # Format already made it RGB
        "batch_idx": b["batch_idx"].numpy().astype(int),
        "cls": b["cls"].numpy().reshape(-1).astype(int),
        "bboxes": b["bboxes"].numpy(),  # normalized xywh
        "files": list(b["im_file"]),
        "names": {int(k): v for k, v in names.items()},
    }

