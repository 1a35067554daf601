"""Batch-size choice: pure decisions from measurements, and the epoch arithmetic.

Nothing here touches a GPU. The decision for `--batch auto` is a function of the
device and (on CUDA) measured peak memory per candidate, so it is tested with
tables; measuring lives in the probe.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from detector.errors import UsageError

DEFAULT_CANDIDATES = (16, 32, 64)
CPU_BATCH = 16
NBS = 64  # Ultralytics' nominal batch size: gradients accumulate to about this many images per step


@dataclass(frozen=True)
class PlanRow:
    """What one batch size means for a dataset of n images (Ultralytics' accumulation)."""

    batch: int
    iterations_per_epoch: int
    accumulate: int
    optimizer_steps_per_epoch: int
    images_per_step: int
    peak_gb: float | None = None
    fits: bool | None = None


@dataclass(frozen=True)
class BatchDecision:
    """The batch a run will use and why; `summary()` is run.json's `batch`."""

    requested: str
    chosen: int
    reason: str
    table: list[PlanRow] = field(default_factory=list)

    def summary(self) -> dict:
        return {"requested": self.requested, "chosen": self.chosen, "reason": self.reason,
                "table": [asdict(r) for r in self.table]}


def parse_batch(value: str | int) -> str | int:
    """'auto' or a positive integer; anything else is a usage error."""
    text = str(value).strip().lower()
    if text == "auto":
        return "auto"
    if text.isdigit() and int(text) > 0:
        return int(text)
    raise UsageError(f"--batch must be 'auto' or a positive integer, not {value!r}")


def plan_row(n_images: int, batch: int, nbs: int = NBS) -> PlanRow:
    """Iterations and optimizer steps per epoch for n_images at batch, as Ultralytics trains.

    Ultralytics steps the optimizer when at least `accumulate = max(round(nbs / batch), 1)`
    iterations have passed since the last step, so an epoch of ceil(n / batch)
    iterations has ceil(iterations / accumulate) steps when epochs are run back to back
    from a step boundary (warmup, which ramps accumulate up from 1, adds a few more).
    """
    iterations = math.ceil(n_images / batch)
    accumulate = max(round(nbs / batch), 1)
    steps = math.ceil(iterations / accumulate)
    return PlanRow(batch=batch, iterations_per_epoch=iterations, accumulate=accumulate,
                   optimizer_steps_per_epoch=steps, images_per_step=batch * accumulate)


def plan(n_images: int, candidates=DEFAULT_CANDIDATES, nbs: int = NBS) -> list[PlanRow]:
    """plan_row for each candidate."""
    return [plan_row(n_images, b, nbs) for b in candidates]


def decide_cpu(requested: str | int, n_images: int, candidates=DEFAULT_CANDIDATES, nbs: int = NBS) -> BatchDecision:
    """The decision without a GPU: an explicit batch as given, 'auto' as 16."""
    table = plan(n_images, candidates, nbs)
    if requested == "auto":
        return BatchDecision("auto", CPU_BATCH, f"no CUDA device: on CPU 'auto' means {CPU_BATCH} (memory is not the limit, "
                             "and larger batches only make each iteration slower)", table)
    return BatchDecision(str(requested), int(requested), "requested explicitly", [plan_row(n_images, int(requested), nbs)])
