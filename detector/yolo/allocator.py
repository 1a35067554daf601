"""A model of PyTorch's CUDA caching allocator: what an allocation trace reserves.

Pure Python, no torch: it replays (allocate, free) events and reports reserved
memory, which is what `torch.cuda.memory_reserved()` shows and what runs out.
The rules follow c10/cuda/CUDACachingAllocator.cpp (PyTorch 2.x, default
settings, one stream, no expandable segments):

- every request is rounded up to a multiple of 512 bytes (kMinBlockSize);
- requests of at most 1 MiB (kSmallSize) come from the small pool, whose
  segments are 2 MiB (kSmallBuffer); larger ones from the large pool, whose
  segments are 20 MiB (kLargeBuffer) for requests under 10 MiB (kMinLargeAlloc)
  and the request rounded up to 2 MiB (kRoundLarge) otherwise;
- a request takes the smallest cached free block of its pool that is large
  enough (best fit; ties by address) and splits it when the rest is at least
  512 bytes (small pool) or more than 1 MiB (large pool);
- a freed block merges with free neighbours of its segment; segments are
  returned only by `empty_cache` (torch.cuda.empty_cache: every segment with no
  allocated block), so until then reserved memory only grows.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

MIN_BLOCK = 512
SMALL_SIZE = 1 << 20
SMALL_BUFFER = 2 << 20
LARGE_BUFFER = 20 << 20
MIN_LARGE_ALLOC = 10 << 20
ROUND_LARGE = 2 << 20


def round_size(nbytes: int) -> int:
    """The bytes the allocator hands out for a request: a multiple of 512 (nothing for an empty tensor)."""
    if nbytes <= 0:
        return 0
    return -(-nbytes // MIN_BLOCK) * MIN_BLOCK


def segment_size(size: int) -> int:
    """The new segment cudaMalloc'd when no cached block can serve a (rounded) request."""
    if size <= SMALL_SIZE:
        return SMALL_BUFFER
    if size < MIN_LARGE_ALLOC:
        return LARGE_BUFFER
    return -(-size // ROUND_LARGE) * ROUND_LARGE


@dataclass
class _Block:
    segment: int
    start: int
    size: int
    free: bool = True
    prev: _Block | None = None
    next: _Block | None = None

    def key(self) -> tuple[int, int, int]:
        return (self.size, self.segment, self.start)


class CachingAllocator:
    """Replays allocations and frees; `reserved`, `allocated` and their peaks in bytes."""

    def __init__(self):
        self._pools: dict[bool, list[tuple[int, int, int]]] = {True: [], False: []}  # small? -> sorted free keys
        self._free: dict[tuple[int, int, int], _Block] = {}
        self._used: dict[int, _Block] = {}  # allocation id -> block
        self._small_segment: list[bool] = []  # per segment: does it belong to the small pool
        self.reserved = self.allocated = self.peak_reserved = self.peak_allocated = 0

    def reset_peak(self) -> None:
        """As torch.cuda.reset_peak_memory_stats: the peaks restart from the current figures."""
        self.peak_reserved, self.peak_allocated = self.reserved, self.allocated

    def empty_cache(self) -> None:
        """torch.cuda.empty_cache(): give back every segment that holds no allocated block."""
        for key in [k for k, b in self._free.items() if b.prev is None and b.next is None]:
            block = self._free[key]
            self._remove_free(block, self._small_segment[block.segment])
            self.reserved -= block.size

    def malloc(self, key: int, nbytes: int) -> None:
        """Allocate `nbytes` for allocation `key` (later freed by the same key)."""
        size = round_size(nbytes)
        if size == 0:
            return
        small = size <= SMALL_SIZE
        block = self._take(small, size)
        if block is None:
            block = _Block(len(self._small_segment), 0, segment_size(size))
            self._small_segment.append(small)
            self.reserved += block.size
        if self._should_split(block, size, small):
            rest = _Block(block.segment, block.start + size, block.size - size, True, block, block.next)
            if block.next is not None:
                block.next.prev = rest
            block.next, block.size = rest, size
            self._add_free(rest, small)
        block.free = False
        self._used[key] = block
        self.allocated += block.size
        self.peak_reserved = max(self.peak_reserved, self.reserved)
        self.peak_allocated = max(self.peak_allocated, self.allocated)

    def free(self, key: int) -> None:
        """Return allocation `key` to its pool, merged with free neighbours of its segment."""
        block = self._used.pop(key, None)
        if block is None:
            return
        self.allocated -= block.size
        small = self._small_segment[block.segment]
        block.free = True
        for other in (block.prev, block.next):
            if other is not None and other.free:
                self._remove_free(other, small)
                if other is block.prev:
                    other.size += block.size
                    other.next = block.next
                    if block.next is not None:
                        block.next.prev = other
                    block = other
                else:
                    block.size += other.size
                    block.next = other.next
                    if other.next is not None:
                        other.next.prev = block
        self._add_free(block, small)

    @staticmethod
    def _should_split(block: _Block, size: int, small: bool) -> bool:
        rest = block.size - size
        return rest >= MIN_BLOCK if small else rest > SMALL_SIZE

    def _take(self, small: bool, size: int) -> _Block | None:
        pool = self._pools[small]
        i = bisect.bisect_left(pool, (size, -1, -1))
        if i == len(pool):
            return None
        block = self._free.pop(pool.pop(i))
        return block

    def _add_free(self, block: _Block, small: bool) -> None:
        block.free = True
        self._free[block.key()] = block
        bisect.insort(self._pools[small], block.key())

    def _remove_free(self, block: _Block, small: bool) -> None:
        pool = self._pools[small]
        i = bisect.bisect_left(pool, block.key())
        del pool[i]
        del self._free[block.key()]
