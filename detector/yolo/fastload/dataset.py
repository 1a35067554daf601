"""Ultralytics' YOLODataset with detector's training pipeline and reduced-scale JPEG decoding.

Everything else (label cache, file list, buffer of recent images that mosaic draws
from, validation with letterbox, close_mosaic) is Ultralytics' own, so the loader
picks the same images the stock one would.
"""

from __future__ import annotations

import ctypes
import math
from pathlib import Path

import cv2
import numpy as np
import torch
from ultralytics.data.dataset import YOLODataset

from detector.yolo.fastload.pipeline import FastTrainPipeline

JPEG = {".jpg", ".jpeg"}
# cv2 decodes a JPEG at 1/2, 1/4 or 1/8 scale in the DCT, for a fraction of the full decode's cost
REDUCED = ((8, cv2.IMREAD_REDUCED_COLOR_8), (4, cv2.IMREAD_REDUCED_COLOR_4), (2, cv2.IMREAD_REDUCED_COLOR_2))


def supported(dataset, hyp) -> str | None:
    """Why the fast pipeline cannot reproduce this configuration (the stock one then runs), or None."""
    if dataset.use_segments or dataset.use_keypoints or dataset.use_obb:
        return "only detection labels"
    if dataset.channels != 3:
        return "only 3-channel images"
    if dataset.rect or not isinstance(dataset.imgsz, int):
        return "only square training images"
    if float(hyp.mixup) > 0 or float(hyp.cutmix) > 0:
        return "mixup and cutmix are not implemented"
    return None


class FastYOLODataset(YOLODataset):
    """YOLODataset whose training samples come from FastTrainPipeline (validation is unchanged)."""

    fast = False  # set by build_transforms, which Ultralytics calls last in __init__

    def build_transforms(self, hyp=None):
        if not self.augment or supported(self, hyp) is not None:
            self.fast = False
            return super().build_transforms(hyp)
        self.fast = True
        return FastTrainPipeline(self, self.imgsz, hyp)

    @staticmethod
    def collate_fn(batch: list[dict]) -> dict:
        """Ultralytics' collate; in a worker the images are stacked into shared memory.

        A batch from a worker crosses to the training process through shared memory: stacked
        anywhere else, its 16 x 1.2 MB of images (imgsz 640) are copied once more on the way.
        """
        images = [b.pop("img") for b in batch]
        out = YOLODataset.collate_fn(batch)
        out["img"] = _stack(images)
        _release_free_heap()
        return out

    def __getitem__(self, index: int) -> dict:
        if self.fast:
            return self.transforms(index)
        return super().__getitem__(index)

    def load_image(self, i: int, rect_mode: bool = True, resize_short: bool = False):
        """Ultralytics' load_image (long side to imgsz, the mosaic buffer), decoding large JPEGs at reduced scale."""
        if self.ims[i] is not None or self.cache or not rect_mode or resize_short or not self.fast:
            return super().load_image(i, rect_mode, resize_short)
        f = self.im_files[i]
        if Path(f).suffix.lower() not in JPEG or self.npy_files[i].exists():
            return super().load_image(i, rect_mode, resize_short)
        h0, w0 = self.labels[i]["shape"]  # from the label cache, EXIF orientation applied as cv2 applies it
        r = self.imgsz / max(h0, w0)
        im = _decode(f, h0, w0, r)
        if im is None:
            return super().load_image(i, rect_mode, resize_short)
        size = (min(math.ceil(w0 * r), self.imgsz), min(math.ceil(h0 * r), self.imgsz))
        if (im.shape[1], im.shape[0]) != size:
            im = cv2.resize(im, size, interpolation=cv2.INTER_LINEAR)
        self._remember(i, im, (h0, w0))
        return im, (h0, w0), im.shape[:2]

    def _remember(self, i: int, im: np.ndarray, hw0: tuple[int, int]) -> None:
        """Keep the image in Ultralytics' buffer of recent images (mosaic draws its other tiles from it)."""
        self.ims[i], self.im_hw0[i], self.im_hw[i] = im, hw0, im.shape[:2]
        self.buffer.append(i)
        if 1 < len(self.buffer) >= self.max_buffer_length:  # full: forget the oldest
            j = self.buffer.pop(0)
            self.ims[j], self.im_hw0[j], self.im_hw[j] = None, None, None


def _release_free_heap() -> None:
    """Give the heap's free pages back to the system every TRIM_EVERY batches (glibc only; elsewhere nothing).

    Every sample allocates and frees a few 1.2 MB arrays (imgsz 640); once glibc has raised its
    mmap threshold above that size they come from the heap, which then keeps the freed pages:
    peak RSS over one pass grew by 25% from 128 to 1,280 images without this, 2% with it
    (docs/benchmarks.md, "Streaming"). Fixing the threshold instead halved the throughput; trimming
    after every batch cost 0.35 ms per image at imgsz 640, every fourth batch a quarter of that.
    """
    global _BATCHES
    _BATCHES += 1
    if _LIBC is not None and _BATCHES % TRIM_EVERY == 0:
        _LIBC.malloc_trim(0)


def _load_libc():
    try:
        libc = ctypes.CDLL("libc.so.6")
        return libc if hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


_LIBC = _load_libc()
_BATCHES = 0  # batches collated in this process
TRIM_EVERY = 4


def _stack(images: list) -> torch.Tensor:
    """torch.stack, into a shared-memory tensor when called in a DataLoader worker (as torch's default_collate)."""
    if torch.utils.data.get_worker_info() is None:
        return torch.stack(images, 0)
    first = images[0]
    storage = first._typed_storage()._new_shared(len(images) * first.numel(), device=first.device)
    out = first.new(storage).resize_(len(images), *first.shape)
    return torch.stack(images, 0, out=out)


def _decode(f: str, h0: int, w0: int, r: float) -> np.ndarray | None:
    """The JPEG decoded at the largest reduction that still leaves it at least as large as the target."""
    flag = next((flag for k, flag in REDUCED if r * k <= 1), cv2.IMREAD_COLOR)
    k = next((k for k, fl in REDUCED if fl == flag), 1)
    try:
        data = np.fromfile(f, np.uint8)
    except OSError:
        return None
    im = cv2.imdecode(data, flag) if data.size else None
    # a decoder that ignored the reduction or the orientation: let Ultralytics' own path handle the file
    if im is None or im.ndim != 3 or abs(im.shape[0] - h0 / k) > 1 or abs(im.shape[1] - w0 / k) > 1:
        return None
    return im
