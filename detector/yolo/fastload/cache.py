"""Decoded training-scale images in RAM, under a memory cap, filled once before the loader's workers start.

Ultralytics' loader decodes an image again whenever it has left the mosaic buffer
(8 x batch recent images per process), in every worker: on a dataset larger than
the buffer that is one JPEG decode (2.4 ms for a 640x480 coco128 photo, the same in
OpenCV and in libjpeg-turbo's own bindings) per sample, per epoch. Here each image is
decoded and scaled to the training size once, into one arena allocated before the
DataLoader forks its workers, so the workers share its pages (copy-on-write,
never written again) instead of each holding a copy. Images past the cap are
decoded as before. The mosaic buffer and its draws stay Ultralytics' own: a cached
image is handed to the buffer exactly as a freshly decoded one would be.
"""

from __future__ import annotations

import math
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np

CAP_BYTES = 4 << 30  # at most 4 GiB ...
CAP_SHARE = 0.25  # ... and at most a quarter of the memory available when the dataset is built


def training_shape(hw0: tuple[int, int], imgsz: int) -> tuple[int, int]:
    """(h, w) of an image of hw0 once its long side is scaled to imgsz, as Ultralytics' load_image computes it."""
    h0, w0 = hw0
    r = imgsz / max(h0, w0)
    if r == 1:
        return h0, w0
    return min(math.ceil(h0 * r), imgsz), min(math.ceil(w0 * r), imgsz)


def cap_bytes() -> int:
    """The cache's memory cap: CAP_BYTES, or CAP_SHARE of the available memory if that is less."""
    try:
        import psutil

        available = psutil.virtual_memory().available
    except Exception:  # no psutil or no /proc: the fixed cap alone
        return CAP_BYTES
    return int(min(CAP_BYTES, CAP_SHARE * available))


class DecodedCache:
    """Training-scale images by dataset index, in one uint8 arena; None for those past the cap or unreadable."""

    def __init__(self, shapes: list[tuple[int, int]], imgsz: int, cap: int):
        sizes = [h * w * 3 for h, w in (training_shape(s, imgsz) for s in shapes)]
        self.offsets: list[int | None] = []
        total = 0
        for n in sizes:
            fits = total + n <= cap
            self.offsets.append(total if fits else None)
            total += n if fits else 0
        self.arena = np.empty(total, np.uint8)
        self.shapes = [training_shape(s, imgsz) for s in shapes]
        self.ready = np.zeros(len(shapes), bool)

    @property
    def nbytes(self) -> int:
        return self.arena.nbytes

    def get(self, i: int) -> np.ndarray | None:
        """The cached image i (read-only view), or None."""
        if not self.ready[i]:
            return None
        return self._view(i)

    def fill(self, read, threads: int | None = None) -> int:
        """Decode every image that fits with read(i, out) -> bool (True when out now holds image i); return the count.

        Threads, because OpenCV decodes and resizes with the GIL released.
        """
        todo = [i for i, off in enumerate(self.offsets) if off is not None]
        threads = threads or min(8, os.cpu_count() or 1)

        def one(i: int) -> None:
            view = self.arena[self.offsets[i]:self.offsets[i] + self._size(i)].reshape(*self.shapes[i], 3)
            self.ready[i] = bool(read(i, view))

        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(one, todo))
        self.arena.flags.writeable = False  # from here on shared with forked workers, read only
        return int(self.ready.sum())

    def _size(self, i: int) -> int:
        h, w = self.shapes[i]
        return h * w * 3

    def _view(self, i: int) -> np.ndarray:
        off = self.offsets[i]
        return self.arena[off:off + self._size(i)].reshape(*self.shapes[i], 3)
