"""The gradient noise scale measured during training, from the gradients training computes anyway.

One listener, `GradNoise`, reads the parameters' .grad at two points: in the
trainer's optimizer_step (before Ultralytics unscales and clips them) and at the end
of every iteration that did not step. It turns them into per-image gradients of two
batch sizes at the same weights and feeds detector.gradnoise (McCandlish et al. 2018,
appendix A):

- accumulate > 1: each micro-batch's gradient (the change of .grad in that iteration)
  is the small batch, the accumulated step gradient the large one. Same weights, so
  the estimate is unbiased.
- accumulate = 1 (every iteration a step, as in the built-in demo): two consecutive
  steps' gradients are the small batches and their image-weighted mean the large one
  (2b images), every step paired with the one before (overlapping pairs). The second gradient is taken after one update, so the large batch
  mixes two weight states: when the true gradient turns between steps |G_2b|² comes
  out low, so |G|² is biased low and B_simple high, by an amount that grows with the
  learning rate (tools/bench_gradnoise.py measures it against the exhaustive value).

Scale: Ultralytics' detection loss is the per-image loss times the batch size
(v8DetectionLoss.loss returns loss * batch_size), so .grad after one backward is
b x the per-image gradient (x the AMP scale, divided out here; under DDP the loss is
also multiplied by world_size and DDP averages, so .grad is b_global x the per-image
gradient of the global batch). The per-image gradient is .grad / (images x scale).

DDP: the paper's cheaper variant pairs each rank's local gradient (small) with the
all-reduced one (large). DDP reduces inside backward, so rank 0 only ever sees
all-reduced gradients here; the estimate then uses the global micro-batch as the small
batch and the accumulated step as the large one (with accumulate = 1, consecutive
steps). Untested on DDP: this machine has no GPUs.

Cost: one flat copy of the gradients per iteration (4 bytes per parameter, twice with
accumulate = 1 for the pending pair) and two dot products; one device sync.
"""

from __future__ import annotations

import math

import torch

from detector.gradnoise import NoiseAverage

ITERATION_COLUMN = "grad_norm"
EPOCH_COLUMNS = ("grad_noise_scale", "grad_norm_sq", "grad_trace_sigma")


def enabled(run_json: dict) -> bool:
    """Whether the run asked for gradient statistics (run.json config.grad_stats; on unless turned off)."""
    return (run_json.get("config") or {}).get("grad_stats", True) is not False


class GradNoise:
    """Per-iteration gradient norm and per-epoch B_simple, written through the shared Progress' extras."""

    def __init__(self, progress):
        self.p = progress
        self.avg = NoiseAverage()
        self._params: list = []
        self._epoch: int | None = None
        self._stepped = False
        self._reset_group()

    def _reset_group(self) -> None:
        self._prev = None  # the accumulated .grad (flat, unscaled) at the last capture of this step
        self._smalls: list[tuple[float, float]] = []  # (|g_b|², b) of each micro-batch of this step
        self._images = 0
        self._pending = None  # accumulate = 1: the previous step's (flat sum, |g|², images)

    def on_pretrain_routine_end(self, trainer) -> None:
        model = trainer.model.module if hasattr(trainer.model, "module") else trainer.model
        self._params = [q for q in model.parameters() if q.requires_grad]

    def on_train_epoch_start(self, trainer) -> None:
        epoch = trainer.epoch + 1
        if epoch == self._epoch:  # Ultralytics restarted the epoch (zeroed grads, maybe a smaller batch)
            self._reset_group()
        self._epoch = epoch
        self.avg = NoiseAverage()
        self.p.epoch_extra = {}

    def before_step(self, trainer) -> None:
        """Called by the trainer's optimizer_step before Ultralytics unscales, clips and steps."""
        self._stepped = True
        self._capture(trainer, stepping=True)

    def on_train_batch_end(self, trainer) -> None:
        if not self._stepped:
            self._capture(trainer, stepping=False)
        self._stepped = False

    def on_fit_epoch_end(self, trainer) -> None:
        if self.p.in_final:
            return
        a = self.avg
        self.p.epoch_extra = {"grad_noise_scale": a.b_simple, "grad_norm_sq": a.g2, "grad_trace_sigma": a.trace}

    def _flat(self, trainer) -> torch.Tensor | None:
        grads = [q.grad.detach().reshape(-1) for q in self._params if q.grad is not None]
        if not grads:
            return None
        flat = torch.cat(grads).float()
        scaler = getattr(trainer, "scaler", None)
        if scaler is not None and scaler.is_enabled():
            flat /= scaler.get_scale()  # AMP: .grad is still multiplied by the loss scale here
        return flat

    def _capture(self, trainer, stepping: bool) -> None:
        self.p.iteration_extra = {ITERATION_COLUMN: None}
        flat = self._flat(trainer)
        images = self.p.batch_size * max(trainer.world_size, 1)
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
        if len(self._smalls) > 1:  # accumulation: micro-batches and their step, at the same weights
            self.avg.add_group(self._smalls, float(flat.dot(flat)) / self._images**2, self._images)
            self._reset_group()
        else:  # accumulate = 1: this step and the previous one make the large batch
            if self._pending is not None:
                f0, s0, b0 = self._pending
                big = f0 + flat  # both are b x per-image gradient: the sum is (b0 + b) x the mean
                total = b0 + images
                self.avg.add_group([(s0, b0), (micro_sq, images)], float(big.dot(big)) / total**2, total)
            # Overlapping pairs (1-2, 2-3, ...): twice the pairs of disjoint ones for no extra backward pass.
            self._pending = (flat, micro_sq, images)
            self._prev, self._smalls, self._images = None, [], 0
