"""The gradient noise scale measured during training, from the gradients training computes anyway.

One listener, `GradNoise`, reads the parameters' .grad at two points: in the
trainer's optimizer_step (before Ultralytics unscales and clips them) and at the end
of every iteration that did not step. It turns them into per-image gradients of two
batch sizes at the same weights and feeds detector.gradnoise (McCandlish et al. 2018,
appendix A):

- accumulate > 1: each micro-batch's gradient (the change of .grad in that iteration)
  is the small batch, the accumulated step gradient the large one. Same weights, so
  the estimate is unbiased.
- accumulate = 1 (every iteration a step, as in the built-in demo and `--semantics
  true`): the batch is split in two halves inside the step. A forward pre-hook on the
  model runs the first half's forward and backward, reads .grad, and hands the second
  half on to the trainer's own forward and backward, so .grad ends as the sum of the two
  halves at the same weights: the halves are the small batches, the step the large one,
  as with accumulation (no pairing across an update, which read about 3x high). The
  loss items the trainer logs are the halves' image-weighted mean. BatchNorm then sees
  half the batch in those steps (its running statistics are updated twice), and the
  loss is normalised per half, as it would be with accumulate = 2. Batches under
  2 x MIN_HALF images are not split (no estimate in those steps); neither under DDP
  (a second backward on rank 0 alone would desynchronise the all-reduce) nor with
  compile=True (the trainer calls the loss directly), where accumulate = 1 gives no
  estimate.

Scale: Ultralytics' detection loss is the per-image loss times the batch size
(v8DetectionLoss.loss returns loss * batch_size), so .grad after one backward is
b x the per-image gradient (x the AMP scale, divided out here; under DDP the loss is
also multiplied by world_size and DDP averages, so .grad is b_global x the per-image
gradient of the global batch). The per-image gradient is .grad / (images x scale).

DDP: the paper's cheaper variant pairs each rank's local gradient (small) with the
all-reduced one (large). DDP reduces inside backward, so rank 0 only ever sees
all-reduced gradients here; the estimate then uses the global micro-batch as the small
batch and the accumulated step as the large one. Untested on DDP: this machine has no GPUs.

Per epoch the estimates are kept per optimizer step, and a bootstrap over the steps
gives a 90% interval of B_simple (detector.gradnoise.bootstrap): grad_noise_scale_low
and grad_noise_scale_high, the high one empty when unbounded.

Cost: one flat copy of the gradients per capture (4 bytes per parameter), two dot
products and one device sync; with accumulate = 1 the split steps, held to SPLIT_BUDGET
(3%) of the training's time (tools/bench_overhead.py measures it, docs/benchmarks.md).
"""

from __future__ import annotations

import math
import time

import torch

from detector.gradnoise import NoiseAverage

ITERATION_COLUMN = "grad_norm"
EPOCH_COLUMNS = ("grad_noise_scale", "grad_noise_scale_low", "grad_noise_scale_high", "grad_norm_sq",
                 "grad_trace_sigma")
MIN_HALF = 4  # images per half below which a step is not split (tiny batches: BatchNorm outliers)
# With accumulate = 1 a step is split only while the splits' time (the first half's whole pass, counted in
# full although the trainer's own pass shrinks to the other half) stays within this share of the training's
# time since its first step; the other steps give no estimate. A split step costs about 1.5x a plain one
# (docs/benchmarks.md), so splitting every step would cost a third of the training.
SPLIT_BUDGET = 0.03
BOX_KEYS = ("batch_idx", "cls", "bboxes")  # per-box tensors, indexed into the images by batch_idx


def enabled(run_json: dict) -> bool:
    """Whether the run asked for gradient statistics (run.json config.grad_stats; on unless turned off)."""
    return (run_json.get("config") or {}).get("grad_stats", True) is not False


def halves(batch: dict, h: int) -> tuple[dict, dict]:
    """The batch's first h images and the rest, each a batch of its own (boxes renumbered by image).

    Per-image tensors and lists are sliced; the per-box tensors (BOX_KEYS) are split by
    batch_idx; anything else is shared.
    """
    n = len(batch["img"])
    first, second = {}, {}
    idx = batch.get("batch_idx")
    mask = idx < h if isinstance(idx, torch.Tensor) else None
    for k, v in batch.items():
        if k in BOX_KEYS and mask is not None and isinstance(v, torch.Tensor):
            first[k], second[k] = v[mask], v[~mask]
        elif isinstance(v, (torch.Tensor, list, tuple)) and len(v) == n:
            first[k], second[k] = v[:h], v[h:]
        else:
            first[k] = second[k] = v
    if mask is not None:
        second["batch_idx"] = second["batch_idx"] - h
    return first, second


def _mix(a, b, wa: float, wb: float):
    """Image-weighted mean of two halves' loss items (a dict of tensors, or a tensor)."""
    if isinstance(a, dict):
        return {k: (a[k] * wa + b[k] * wb) / (wa + wb) for k in b}
    return (a * wa + b * wb) / (wa + wb)


class GradNoise:
    """Per-iteration gradient norm and per-epoch B_simple with its interval, through the shared Progress' extras."""

    def __init__(self, progress, split_budget: float | None = None):
        self.p = progress
        self.split_budget = SPLIT_BUDGET if split_budget is None else split_budget  # inf: split every step
        self.avg = NoiseAverage()
        self._params: list = []
        self._epoch: int | None = None
        self._stepped = False
        self._trainer = None
        self._hooks: list = []
        self._first = None  # a split step: (the first half's loss items, its images, the second half's images)
        self._clock: float | None = None  # when the first training step began (the split budget's start)
        self._split_seconds = 0.0
        self._reset_group()

    def _reset_group(self) -> None:
        self._prev = None  # the accumulated .grad (flat, unscaled) at the last capture of this step
        self._smalls: list[tuple[float, float]] = []  # (|g_b|², b) of each micro-batch of this step
        self._images = 0

    def on_pretrain_routine_end(self, trainer) -> None:
        model = trainer.model.module if hasattr(trainer.model, "module") else trainer.model
        self._params = [q for q in model.parameters() if q.requires_grad]
        self._trainer = trainer
        for h in self._hooks:  # Ultralytics rebuilds the model after an out-of-memory halving
            h.remove()
        # On the model after Ultralytics made its EMA copy, so the copy (and the checkpoints) carry no hook.
        self._hooks = [trainer.model.register_forward_pre_hook(self._split),
                       trainer.model.register_forward_hook(self._merge)]

    def on_train_epoch_start(self, trainer) -> None:
        epoch = trainer.epoch + 1
        if epoch == self._epoch:  # Ultralytics restarted the epoch (zeroed grads, maybe a smaller batch)
            self._reset_group()
        self._epoch = epoch
        self.avg = NoiseAverage()
        self.p.epoch_extra = {}

    def _split(self, module, args):
        """Forward pre-hook: with accumulate = 1, the first half's forward and backward here, the second half on."""
        trainer = self._trainer
        batch = args[0] if args else None
        if (not module.training or not isinstance(batch, dict) or "img" not in batch
                or getattr(trainer, "accumulate", 1) != 1 or max(getattr(trainer, "world_size", 1), 1) > 1):
            return None
        n = len(batch["img"])
        now = time.perf_counter()
        self._clock = now if self._clock is None else self._clock
        if n < 2 * MIN_HALF or self._split_seconds > self.split_budget * (now - self._clock):
            return None
        first, second = halves(batch, n // 2)
        loss, items = module.loss(first)
        with torch.autocast(batch["img"].device.type, enabled=False):  # backward outside autocast, as the trainer
            scaler = getattr(trainer, "scaler", None)
            (scaler.scale(loss.sum()) if scaler is not None else loss.sum()).backward()
        h = len(first["img"])
        self._capture(trainer, stepping=False, images=h)
        self._first = (items, h, n - h)
        self._split_seconds += time.perf_counter() - now
        return (second, *args[1:])

    def _merge(self, module, args, output):
        """Forward hook: the trainer logs the loss items of the whole batch (the halves' image-weighted mean)."""
        if self._first is None or not isinstance(output, tuple) or len(output) != 2:
            return None
        items, h, rest = self._first
        return output[0], _mix(items, output[1], h, rest)

    def before_step(self, trainer) -> None:
        """Called by the trainer's optimizer_step before Ultralytics unscales, clips and steps."""
        self._stepped = True
        split, self._first = self._first, None
        self._capture(trainer, stepping=True, images=split[2] if split else None, whole=split is not None)

    def on_train_batch_end(self, trainer) -> None:
        if not self._stepped:
            self._capture(trainer, stepping=False)
        self._stepped = False
        self._first = None

    def on_fit_epoch_end(self, trainer) -> None:
        if self.p.in_final:
            return
        a = self.avg
        low, high = a.interval()
        self.p.epoch_extra = {"grad_noise_scale": a.b_simple, "grad_noise_scale_low": low,
                              "grad_noise_scale_high": high, "grad_norm_sq": a.g2, "grad_trace_sigma": a.trace}

    def _flat(self, trainer) -> torch.Tensor | None:
        grads = [q.grad.detach().reshape(-1) for q in self._params if q.grad is not None]
        if not grads:
            return None
        flat = torch.cat(grads).float()
        scaler = getattr(trainer, "scaler", None)
        if scaler is not None and scaler.is_enabled():
            flat /= scaler.get_scale()  # AMP: .grad is still multiplied by the loss scale here
        return flat

    def _capture(self, trainer, stepping: bool, images: int | None = None, whole: bool = False) -> None:
        self.p.iteration_extra = {ITERATION_COLUMN: None}
        flat = self._flat(trainer)
        images = images or self.p.batch_size * max(trainer.world_size, 1)
        if flat is None or images < 1:
            return
        micro = flat - self._prev if self._prev is not None else flat
        micro_sq = float(micro.dot(micro)) / images**2
        if not math.isfinite(micro_sq):  # an AMP overflow: the scaler will skip this step
            self._reset_group()
            return
        self.p.iteration_extra = {ITERATION_COLUMN: math.sqrt(micro_sq)}
        self._smalls.append((micro_sq, images))
        self._images += images
        if not stepping:
            self._prev = flat
            return
        if len(self._smalls) > 1:  # micro-batches (or halves) and their step, at the same weights
            big_sq = float(flat.dot(flat)) / self._images**2
            self.avg.add_group(self._smalls, big_sq, self._images)
            if whole:  # a split step: the iteration's gradient is the whole batch's
                self.p.iteration_extra = {ITERATION_COLUMN: math.sqrt(big_sq)}
        self._reset_group()
