"""Ultralytics' YOLODataset with detector's training pipeline, reduced-scale JPEG decoding and a RAM cache.

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

from detector.yolo.fastload.cache import DecodedCache, cap_bytes
from detector.yolo.fastload.pipeline import FastTrainPipeline
from detector.yolo.fastload.shared import BatchRing, ByValue, Tracked, new_shared

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
    decoded: DecodedCache | None = None
    ring: BatchRing | None = None

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.fast:  # made here, in the training process, so that the workers forked later share its flags
            self.ring = BatchRing()
        if self.fast and not self.cache:  # Ultralytics' own cache=ram/disk, when asked for, stays its own
            self.decoded = DecodedCache([lb["shape"] for lb in self.labels], self.imgsz, cap_bytes())
            self.decoded.fill(self._read_into)

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
        shared = [b.pop("_shared", None) for b in batch][0]
        out = YOLODataset.collate_fn(batch)
        out["img"] = _stack(images)
        if shared is not None:  # a reused segment: the training process frees it when it lets the batch go
            out["img"] = Tracked(out["img"], *shared)
            for k in ("cls", "bboxes", "batch_idx"):
                out[k] = ByValue(out[k])
        _release_free_heap()
        return out

    def __getitem__(self, index: int) -> dict:
        if self.fast:
            return self.transforms(index)
        return super().__getitem__(index)

    def __getitems__(self, indexes: list[int]) -> list[dict]:
        """A batch's samples (torch's DataLoader asks for them together), their images written into one batch tensor.

        Each sample's image is a view of the batch, which the collate hands on as it is: no stack copy, and in a
        worker the batch is shared memory, so it crosses to the training process without one more copy either.
        """
        if not self.fast:
            return [self[i] for i in indexes]
        shape = (len(indexes), 3, self.imgsz, self.imgsz)
        worker = torch.utils.data.get_worker_info()
        if worker is None or self.ring is None:
            batch, flag = torch.empty(shape, dtype=torch.uint8), None
        else:  # a shared segment of this worker's ring (detector.yolo.fastload.shared)
            batch, flag = self.ring.take(worker.id, shape)
        try:
            samples = [self.transforms(i, into=batch[k]) for k, i in enumerate(indexes)]
        except BaseException:
            if self.ring is not None:
                self.ring.release(flag)
            raise
        if flag is not None:
            samples[0]["_shared"] = (self.ring.key, flag)
        return samples

    def load_image(self, i: int, rect_mode: bool = True, resize_short: bool = False):
        """Ultralytics' load_image (long side to imgsz, the mosaic buffer), decoding large JPEGs at reduced scale."""
        if self.ims[i] is not None or self.cache or not rect_mode or resize_short or not self.fast:
            return super().load_image(i, rect_mode, resize_short)
        h0, w0 = self.labels[i]["shape"]  # from the label cache, EXIF orientation applied as cv2 applies it
        cached = self.decoded.get(i) if self.decoded is not None else None
        if cached is not None:
            self._remember(i, cached, (h0, w0))
            return cached, (h0, w0), cached.shape[:2]
        f = self.im_files[i]
        if Path(f).suffix.lower() not in JPEG or self.npy_files[i].exists():
            return super().load_image(i, rect_mode, resize_short)
        r = self.imgsz / max(h0, w0)
        im = _decode(f, h0, w0, r)
        if im is None:
            return super().load_image(i, rect_mode, resize_short)
        size = (min(math.ceil(w0 * r), self.imgsz), min(math.ceil(h0 * r), self.imgsz))
        if (im.shape[1], im.shape[0]) != size:
            im = cv2.resize(im, size, interpolation=cv2.INTER_LINEAR)
        self._remember(i, im, (h0, w0))
        return im, (h0, w0), im.shape[:2]

    def _read_into(self, i: int, out: np.ndarray) -> bool:
        """Decode image i at training scale into out (the cache's slot); False to leave it to load_image."""
        from ultralytics.utils.patches import imread

        f, (h0, w0) = self.im_files[i], self.labels[i]["shape"]
        if self.npy_files[i].exists():  # Ultralytics' .npy files take precedence over the image
            return False
        if Path(f).suffix.lower() in JPEG:
            im = _decode(f, h0, w0, self.imgsz / max(h0, w0))
        else:
            im = imread(f, flags=cv2.IMREAD_COLOR)
            im = im if im is not None and im.ndim == 3 and im.shape[:2] == (h0, w0) else None
        if im is None:
            return False
        if im.shape[:2] == out.shape[:2]:
            out[...] = im
        else:
            cv2.resize(im, out.shape[1::-1], dst=out, interpolation=cv2.INTER_LINEAR)
        return True

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


def _new_batch(shape: tuple[int, ...]) -> torch.Tensor:
    """An empty uint8 batch: in shared memory in a DataLoader worker (as torch's default_collate makes it)."""
    if torch.utils.data.get_worker_info() is None:
        return torch.empty(shape, dtype=torch.uint8)
    return new_shared(shape)


def _stack(images: list) -> torch.Tensor:
    """The images as one batch: their batch itself when they are its rows in order (__getitems__), else stacked."""
    base = images[0]._base
    if base is not None and base.shape[0] == len(images) and base.shape[1:] == images[0].shape and all(
            im._base is base and im.data_ptr() == base[k].data_ptr() for k, im in enumerate(images)):
        return base
    out = _new_batch((len(images), *images[0].shape)) if images[0].dtype == torch.uint8 else None
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
