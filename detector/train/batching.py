"""Batch-size choice: pure decisions from measurements, and the epoch arithmetic.

Nothing here touches a GPU. The decision for `--batch auto` is a function of the
device and (on CUDA) measured peak memory per candidate, so it is tested with
tables; measuring lives in the probe.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace

from detector import facts
from detector.config import DEFAULT_CANDIDATES, DEFAULT_SAFETY, check_safety
from detector.errors import BatchError

CPU_BATCH = 16



@dataclass(frozen=True)
class PlanRow:
    """What one batch size means for a dataset of n images (Ultralytics' accumulation)."""

    batch: int
    iterations_per_epoch: int
    accumulate: int
    optimizer_steps_per_epoch: float  # on average: Ultralytics' step cadence runs on across epoch boundaries
    images_per_step: int
    peak_gb: float | None = None
    fits: bool | None = None
    per_device_batch: int | None = None  # several GPUs: Ultralytics gives each batch // world_size
    train_peak_gb: float | None = None
    val_peak_gb: float | None = None
    allocated_peak_gb: float | None = None
    note: str | None = None
    predicted_peak_gb: float | None = None  # the memory model's reserved peak, beside the probe's measurement


@dataclass(frozen=True)
class Measurement:
    """What the probe measured for one per-device batch: peaks in GiB, or where it ran out of memory."""

    batch: int
    train_peak_gb: float | None = None  # training steps at `batch`
    val_peak_gb: float | None = None  # the validation pass at 2 x batch, as Ultralytics validates
    oom: str | None = None  # "training" or "validation" when that phase ran out of memory
    allocated_peak_gb: float | None = None  # tensors alone, without the allocator's cache (for comparison)

    @property
    def peak_gb(self) -> float | None:
        peaks = [p for p in (self.train_peak_gb, self.val_peak_gb) if p is not None]
        return max(peaks) if peaks and not self.oom else None


@dataclass(frozen=True)
class BatchDecision:
    """The batch a run will use and why; `summary()` is run.json's `batch`."""

    requested: str
    chosen: int
    reason: str
    table: list[PlanRow] = field(default_factory=list)
    probe: dict | None = None  # on CUDA: device, budget, labels per image, seconds the probe took

    def summary(self) -> dict:
        out = {"requested": self.requested, "chosen": self.chosen, "reason": self.reason,
               "table": [asdict(r) for r in self.table]}
        return {**out, "probe": self.probe} if self.probe is not None else out


def plan_row(n_images: int, batch: int, nbs: int = facts.NBS) -> PlanRow:
    """Iterations and optimizer steps per epoch for n_images at batch, as Ultralytics trains.

    Ultralytics steps the optimizer when at least `accumulate = max(round(nbs / batch), 1)`
    iterations have passed since the last step, and that count runs on across epoch
    boundaries, so an epoch of ceil(n / batch) iterations makes iterations / accumulate
    steps on average (6.25 for 400 images at batch 16: epochs alternate 6 and 7).
    Warmup, which ramps accumulate up from 1, adds a few in the first epochs.
    """
    iterations = math.ceil(n_images / batch)
    accumulate = facts.accumulate(batch, nbs)
    steps = round(iterations / accumulate, 2)
    return PlanRow(batch=batch, iterations_per_epoch=iterations, accumulate=accumulate,
                   optimizer_steps_per_epoch=steps, images_per_step=batch * accumulate)


def plan(n_images: int, candidates=DEFAULT_CANDIDATES, nbs: int = facts.NBS) -> list[PlanRow]:
    """plan_row for each candidate."""
    return [plan_row(n_images, b, nbs) for b in candidates]


def decide_cpu(requested: str | int, n_images: int, candidates=DEFAULT_CANDIDATES, nbs: int = facts.NBS) -> BatchDecision:
    """The decision without a GPU: an explicit batch as given, 'auto' as 16."""
    table = plan(n_images, candidates, nbs)
    if requested == "auto":
        return BatchDecision("auto", CPU_BATCH, f"no CUDA device: on CPU 'auto' means {CPU_BATCH} (memory is not the limit, "
                             "and larger batches only make each iteration slower)", table)
    return BatchDecision(str(requested), int(requested), "requested explicitly", [plan_row(n_images, int(requested), nbs)])


def budget_gb(total_memory_gb: float, safety_fraction: float, baseline_gb: float = 0.0) -> float:
    """What a candidate's peak may use: safety_fraction of the GPU's memory, less what is already in use on it."""
    return safety_fraction * total_memory_gb - baseline_gb


def step_down(current: int, candidates) -> int | None:
    """The next smaller candidate below the batch that ran out of memory, or None when none is left."""
    smaller = [c for c in candidates if c < current]
    return max(smaller) if smaller else None


def decide_gpu(measurements, total_memory_gb: float, safety_fraction: float = DEFAULT_SAFETY,
               candidates=DEFAULT_CANDIDATES, n_images: int = 0, nbs: int = facts.NBS, devices: int = 1,
               baseline_gb: float = 0.0, device_name: str = "the GPU", imgsz: int | None = None,
               basis: str = "measured") -> BatchDecision:
    """The largest candidate whose measured peak fits safety_fraction of the (smallest) GPU's memory.

    Candidates and measurements are per GPU. With several GPUs Ultralytics takes the
    total batch and gives each GPU `batch // world_size`, so the chosen total is
    candidate x devices, decided against the smallest GPU. baseline_gb is memory
    already in use on that GPU outside PyTorch's allocator (CUDA context, other
    processes). A candidate counts only while every smaller one fits too: memory
    grows with the batch, so a gap means the measurement cannot be trusted.
    Raises BatchError with the figures when even the smallest does not fit. basis says
    where the peaks come from: "measured" by the probe, or "predicted" by the memory model.
    """
    candidates = sorted(set(candidates))
    budget = budget_gb(total_memory_gb, check_safety(safety_fraction), baseline_gb)
    by_batch = {m.batch: m for m in measurements}
    rows, blocked = [], None
    for c in candidates:
        row = _gpu_row(c, by_batch.get(c), budget, n_images, nbs, devices, blocked)
        if not row.fits and blocked is None:
            blocked = c
        rows.append(row)
    fitting = [r for r in rows if r.fits]
    if not fitting:
        raise BatchError(_nothing_fits(rows[0], by_batch.get(candidates[0]), budget, safety_fraction,
                                       total_memory_gb, device_name, imgsz))
    best = fitting[-1]
    m = by_batch[best.per_device_batch]
    reason = (f"batch {best.per_device_batch}{' per GPU' if devices > 1 else ''} is the largest candidate whose "
              f"{basis} peak, {best.peak_gb:.2f} GB (training {m.train_peak_gb:.2f}, validation at batch "
              f"{facts.val_batch(m.batch)} {m.val_peak_gb:.2f}), fits {safety_fraction:.0%} of {device_name}'s "
              f"{total_memory_gb:.1f} GB ({_budget_text(budget, baseline_gb)})")
    if devices > 1:
        reason += (f"; on {devices} GPUs Ultralytics gets batch={best.batch} and gives each GPU "
                   f"{best.batch} // {devices} = {best.per_device_batch}")
    return BatchDecision("auto", best.batch, reason, rows)


def _gpu_row(c: int, m: Measurement | None, budget: float, n_images: int, nbs: int, devices: int,
             blocked: int | None) -> PlanRow:
    row = replace(plan_row(n_images, c * devices, nbs), per_device_batch=c)
    if m is None:
        return replace(row, fits=False, note="not probed: a smaller batch did not fit")
    row = replace(row, train_peak_gb=_round(m.train_peak_gb), val_peak_gb=_round(m.val_peak_gb),
                  peak_gb=_round(m.peak_gb), allocated_peak_gb=_round(m.allocated_peak_gb))
    if m.oom:
        at = f" at batch {facts.val_batch(c)}" if m.oom == "validation" else ""
        return replace(row, fits=False, note=f"out of memory in {m.oom}{at}")
    if m.peak_gb is None or m.peak_gb > budget:
        return replace(row, fits=False, note=f"over the {budget:.2f} GB budget")
    if blocked is not None:
        return replace(row, fits=False, note=f"ignored: the smaller batch {blocked} did not fit")
    return replace(row, fits=True)


def _round(x: float | None) -> float | None:
    return None if x is None else round(x, 3)


def _budget_text(budget: float, baseline_gb: float) -> str:
    return f"budget {budget:.2f} GB" + (f" after {baseline_gb:.2f} GB already in use" if baseline_gb else "")


def _nothing_fits(row: PlanRow, m: Measurement | None, budget: float, safety: float, total: float,
                  device_name: str, imgsz: int | None) -> str:
    c = row.per_device_batch
    if m is not None and m.oom:
        found = (f"ran out of memory in {m.oom}" + (f" (validation runs at batch {facts.val_batch(c)})" if m.oom == "validation"
                                                     else "") + f" on its {total:.1f} GB")
    elif m is not None and m.peak_gb is not None:
        found = (f"needs {m.peak_gb:.2f} GB (training {m.train_peak_gb:.2f}, validation at batch {facts.val_batch(c)} "
                 f"{m.val_peak_gb:.2f}) but {safety:.0%} of its {total:.1f} GB allows {budget:.2f} GB")
    else:
        found = "was not measured"
    lower = f"a lower --imgsz than {imgsz}" if imgsz else "a lower --imgsz"
    return (f"no batch size fits on {device_name}: even the smallest candidate, {c}, {found}; use {lower}, "
            f"a smaller --model (yolo11n.yaml), or an explicit smaller batch such as --batch {max(c // 2, 1)}")


def explain(n_images: int, nbs: int = facts.NBS) -> str:
    """The batch / iteration / epoch / optimizer-step arithmetic in one paragraph, for the user's own data."""
    import textwrap

    text = (f"A batch is the images of one forward and backward pass, and an iteration processes one batch; an "
            f"epoch is one pass over the {n_images} training images, so it takes ceil({n_images} / batch) "
            f"iterations. Ultralytics accumulates gradients over round({nbs} / batch) iterations (at least 1) "
            f"before each optimizer step (nbs={nbs}), so each weight update sees about max({nbs}, batch) images "
            f"whatever the batch; what the batch changes is memory, speed and the BatchNorm statistics (warmup "
            f"adds a few extra steps in the first epochs).")
    return textwrap.fill(text, width=100)


def table_text(decision: BatchDecision) -> str:
    """The decision table as aligned text, the chosen row marked with '*'."""
    multi = any(r.per_device_batch not in (None, r.batch) for r in decision.table)
    model = any(r.predicted_peak_gb is not None for r in decision.table)  # the memory model beside the probe
    head = ["", "batch"] + (["per GPU"] if multi else []) + ["train GB", "val GB (2x)", "peak GB"] + (
        ["predicted GB"] if model else []) + ["fits", "it/epoch", "accumulate", "steps/epoch", "img/step", ""]
    lines = [head]
    for r in decision.table:
        cells = ["*" if r.batch == decision.chosen else "", str(r.batch)]
        cells += [str(r.per_device_batch)] if multi else []
        cells += [_gb(r.train_peak_gb), _gb(r.val_peak_gb), _gb(r.peak_gb)] + ([_gb(r.predicted_peak_gb)] if model else [])
        cells += ["-" if r.fits is None else ("yes" if r.fits else "no"), str(r.iterations_per_epoch),
                  str(r.accumulate), f"{r.optimizer_steps_per_epoch:g}", str(r.images_per_step), r.note or ""]
        lines.append(cells)
    widths = [max(len(row[i]) for row in lines) for i in range(len(head))]
    return "\n".join("  ".join(cell.rjust(w) if i < len(head) - 1 else cell for i, (cell, w) in
                               enumerate(zip(row, widths))).rstrip() for row in lines)


def _gb(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"
