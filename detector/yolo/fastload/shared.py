"""Shared-memory batches that a loader worker reuses once the training process has let go of them.

A DataLoader worker hands each batch to the training process through shared memory:
torch's collate creates a new segment per batch, and the kernel then maps and zeroes
its 19.7 MB (16 x 640 x 640 x 3) page by page while the batch is written. Measured on
the 2-core machine: 2.2 CPU ms per image for a new segment against 0.45 for writing the
same batch into one already mapped, so at 640 with 2 workers a third of the stock
loader's CPU per image went to fresh shared pages.

Here each worker keeps a ring of segments. A batch leaves the worker wrapped so that
the training process, when it unpickles it, attaches a finalizer to the image tensor;
the finalizer marks the segment free in a flag array shared by all processes (made
before the workers fork). A worker writes into a segment only when its flag says free,
so a batch the training process still holds (or any view of it) is never overwritten;
when no segment is free it makes a new one, as torch would.
"""

from __future__ import annotations

import math
import uuid
import weakref

import torch

SLOTS = 6  # segments per worker: the DataLoader keeps up to prefetch_factor (4) batches per worker in flight
MAX_WORKERS = 64
FREE, BUSY = 0, 1
_RINGS: dict[str, torch.Tensor] = {}  # in the training process: each ring's flags, by key


def new_shared(shape: tuple[int, ...]) -> torch.Tensor:
    """An empty uint8 tensor in a new shared-memory segment (as torch's default_collate makes it in a worker)."""
    template = torch.empty(0, dtype=torch.uint8)
    storage = template._typed_storage()._new_shared(math.prod(shape), device=template.device)
    return template.new(storage).resize_(*shape)


class BatchRing:
    """Per-worker rings of shared batches and their free/busy flags; made in the training process, before fork."""

    def __init__(self):
        self.flags = torch.zeros(MAX_WORKERS * SLOTS, dtype=torch.uint8).share_memory_()
        self.key = uuid.uuid4().hex  # batches name their ring by key: the flags themselves need not travel
        _RINGS[self.key] = self.flags
        self.slots: list[torch.Tensor | None] = [None] * SLOTS  # this worker's own segments (after fork)
        self.last = -1

    def take(self, worker: int, shape: tuple[int, ...]) -> tuple[torch.Tensor, int | None]:
        """A batch tensor of shape for this worker, and its flag index (None: a fresh segment, not tracked)."""
        if worker >= MAX_WORKERS:
            return new_shared(shape), None
        for k in range(1, SLOTS + 1):
            slot = (self.last + k) % SLOTS
            flag = worker * SLOTS + slot
            if self.flags[flag] != FREE:
                continue
            tensor = self.slots[slot]
            if tensor is None or tuple(tensor.shape) != shape:
                tensor = self.slots[slot] = new_shared(shape)
            self.flags[flag] = BUSY
            self.last = slot
            return tensor, flag
        return new_shared(shape), None

    def release(self, flag: int | None) -> None:
        """Mark a segment free again (the batch never left the worker)."""
        if flag is not None:
            self.flags[flag] = FREE


class Tracked:
    """A batch's image tensor on its way to the training process; unpickled there as the tensor itself.

    Pickled, it carries its ring's key and flag index; rebuilt, it frees the flag when the tensor dies.
    """

    def __init__(self, tensor: torch.Tensor, key: str, flag: int):
        self.tensor, self.key, self.flag = tensor, key, flag

    def __reduce__(self):
        return _arrived, (self.tensor, self.key, self.flag)


class ByValue:
    """A small tensor (boxes, classes, indexes) sent as bytes rather than as a shared-memory segment.

    torch moves every tensor a worker returns into a new shared segment and passes its file descriptor
    through multiprocessing's resource sharer (a connection with an authentication handshake per descriptor);
    for a few hundred bytes, copying them through the pipe costs less.
    """

    def __init__(self, tensor: torch.Tensor):
        self.tensor = tensor

    def __reduce__(self):
        return torch.from_numpy, (self.tensor.numpy(),)


def _arrived(tensor: torch.Tensor, key: str, flag: int) -> torch.Tensor:
    """In the training process: the batch's tensor, whose last reference (views included) frees its segment."""
    flags = _RINGS.get(key)
    if flags is not None:  # elsewhere (a process that did not make the ring) the segment simply stays taken
        weakref.finalize(tensor, _free, flags, flag)
    return tensor


def _free(flags: torch.Tensor, flag: int) -> None:
    flags[flag] = FREE
