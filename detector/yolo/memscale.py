"""Allocation traces at any batch and box count from two reference traces.

A fake run costs seconds whatever the batch (fake tensors have no data), and the
same program at another batch or box count makes the same storages in the same
order: only their sizes change. Every storage's size is a product of its shape's
dimensions, so it is proportional to the batch, to the boxes per image (the label
assigner's (batch, boxes, anchors) tensors), to both, or to neither. Two traces,
the second at twice the batch and three times the boxes, tell which for each
storage (size ratio 2, 3, 6 or 1); any (batch, boxes) is then a rescaling and an
allocator replay, a fraction of a second. Training storages scale with the
training boxes, validation ones with the validation boxes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

BATCH_STEP = 2  # the second reference trace runs at twice the batch
BOX_STEP = 3  # ... and three times the boxes per image: ratios 1, 2, 3, 6 tell the exponents apart
_RATIOS = {(0, 0): 1.0, (1, 0): 2.0, (0, 1): 3.0, (1, 1): 6.0}


class TraceMismatch(RuntimeError):
    """The two reference traces did not make the same storages in the same order."""


@dataclass
class TraceFamily:
    """Two aligned traces (fakerun.Trace) at (batch, boxes, val_boxes) and their scaled sizes on demand."""

    base: object  # fakerun.Trace at (batch, boxes, val_boxes)
    batch: int
    boxes: int
    val_boxes: int
    exponents: list  # per event: (batch exponent, boxes exponent), or None for a release

    @classmethod
    def from_traces(cls, first, second, batch: int, boxes: int, val_boxes: int) -> TraceFamily:
        a, b = first.events, second.events
        if len(a) != len(b) or first.val_start != second.val_start or first.iter2_start != second.iter2_start:
            raise TraceMismatch(f"{len(a)} against {len(b)} events")
        exps = []
        for (s1, id1, _), (s2, id2, _) in zip(a, b):
            if (s1 > 0) != (s2 > 0) or id1 != id2:
                raise TraceMismatch(f"event for storage {id1} against {id2}")
            exps.append(_exponents(s2 / s1) if s1 > 0 else None)
        return cls(first, batch, boxes, max(val_boxes, 1), exps)

    def events(self, batch: int, boxes: int, val_boxes: int) -> list:
        """The trace at another batch and box counts: (bytes, storage id, phase); a release is negative."""
        fb = batch / self.batch
        ft, fv = boxes / self.boxes, max(val_boxes, 1) / self.val_boxes
        start = self.base.val_start if self.base.val_start is not None else len(self.base.events)
        out, sizes = [], {}
        for i, ((size, sid, phase), e) in enumerate(zip(self.base.events, self.exponents)):
            if e is None:  # a release: as large as what was allocated
                size = -sizes.pop(sid, -size)
            elif e != (0, 0):
                size = max(int(math.ceil(size * fb ** e[0] * (ft if i < start else fv) ** e[1])), 1)
            if size > 0:
                sizes[sid] = size
            out.append((size, sid, phase))
        return out


def _exponents(ratio: float) -> tuple[int, int]:
    """The (batch, boxes) exponents whose size ratio is nearest `ratio` (log scale)."""
    return min(_RATIOS, key=lambda k: abs(math.log(max(ratio, 1e-9) / _RATIOS[k])))
