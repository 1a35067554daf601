"""The gradient noise scale at fixed weights, exhaustively and through the training-time meter.

Used by tools/bench_gradnoise.py only, to set detector.yolo.gradstats' estimates beside
an exhaustive reference on a real YOLO (no test runs it: it takes minutes;
tests/test_gradnoise.py checks the meter against exact per-example gradients of a
small linear model instead). At fixed weights it runs every batch of the training
loader (several shuffled passes, augmented as in training, BatchNorm in train mode,
the trainer's own loss) and computes:

- the exhaustive value: the full-data gradient G as the mean of all batch gradients
  (each pass partitions the training set) and tr(Σ) from the spread of the batch
  gradients around it (detector.gradnoise.exhaustive). Per-image (b = 1)
  gradients are not used: with BatchNorm and Ultralytics' loss normalised by the
  batch's target scores a one-image batch is another function (the design notes
  measured +13% |G|² at b = 2 and outliers at b = 4), so the reference works at the
  training batch b;
- a 95% percentile bootstrap interval of the exhaustive value, resampling the batch
  gradients (their Gram matrix is kept, the gradients in half precision);
- the meter's estimates fed with the same kind of gradients, with no weight update in
  between: each batch split in halves (accumulate = 1) and accumulation groups.

The model's BatchNorm running statistics are restored afterwards and .grad cleared.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import math

import torch

from detector.gradnoise import exhaustive
from detector.yolo.callbacks import Progress
from detector.yolo.gradstats import GradNoise


def _params(model) -> list:
    return [q for q in model.parameters() if q.requires_grad]


def _backward(trainer, model, batch) -> int:
    batch = trainer.preprocess_batch(batch)
    loss, _ = model(batch)
    loss.sum().backward()
    return int(batch["img"].shape[0])


def _flat(params) -> torch.Tensor:
    return torch.cat([(q.grad if q.grad is not None else torch.zeros_like(q)).reshape(-1) for q in params]).float()


def _meter(trainer, model, loader, accumulate: int) -> tuple[GradNoise, SimpleNamespace]:
    stub = SimpleNamespace(model=model, train_loader=loader, world_size=1, scaler=None, epoch=0, accumulate=accumulate)
    meter = GradNoise(Progress(), split_budget=math.inf)  # at fixed weights every batch is split
    meter.on_pretrain_routine_end(stub)
    meter.on_train_epoch_start(stub)
    return meter, stub


def reference_interval(grams: np.ndarray, sq: np.ndarray, b: int, level: float = 0.95, resamples: int = 1000):
    """Percentile bootstrap of the exhaustive B_simple over the m batch gradients (Gram matrix grams, |g_j|² sq)."""
    rng = np.random.default_rng(0)
    m, out = len(sq), []
    for _ in range(resamples):
        c = np.bincount(rng.integers(0, m, m), minlength=m).astype(float)
        _, _, bs = exhaustive(float(c @ sq) / m, float(c @ grams @ c) / m**2, b, m)
        out.append(np.inf if bs is None else bs)
    tail = (1 - level) / 2
    low, high = np.quantile(out, [tail, 1 - tail])
    return float(low), (float(high) if np.isfinite(high) else None)


def measure(trainer, loader, passes: int = 4, group: int = 4) -> dict:
    """Exhaustive |G|², tr(Σ), B_simple (with a 95% interval) at the current weights, and the meter's two estimates."""
    model = trainer.model.module if hasattr(trainer.model, "module") else trainer.model
    saved = {k: v.clone() for k, v in model.state_dict().items() if "running_" in k or "num_batches" in k}
    params, n = _params(model), len(loader.dataset)
    model.train()
    accumulate, trainer.accumulate = trainer.accumulate, 0  # the training's own meter must not split these batches
    split, split_stub = _meter(trainer, model, loader, 1)
    acc, acc_stub = _meter(trainer, model, loader, group)
    grads, m, nominal = [], 0, None
    try:
        for _ in range(passes):  # accumulate = 1 stream: every batch from zero grads, split in halves by the meter
            for batch in loader:
                for q in params:
                    q.grad = None
                split.p.batch_size = b = _backward(trainer, model, batch)
                nominal = nominal or b
                split.before_step(split_stub)
                split.on_train_batch_end(split_stub)
                if b == nominal:  # a short last batch would weigh differently in the partition
                    grads.append((_flat(params) / b).half())
                    m += 1
        for h in split._hooks:
            h.remove()
        acc_stream(trainer, model, loader, params, acc, acc_stub, passes, group)
    finally:
        for h in split._hooks + acc._hooks:
            h.remove()
        trainer.accumulate = accumulate
        for q in params:
            q.grad = None
        model.load_state_dict(saved, strict=False)
    grams = gram(grads)
    sq = np.diag(grams).copy()
    full_sq = float(grams.sum()) / m**2
    g2, trace, bs = exhaustive(float(sq.mean()), full_sq, nominal, m)
    low, high = reference_interval(grams, sq, nominal)
    return {"images": n, "batch": nominal, "batches": m, "exact_g2": g2, "exact_trace": trace, "exact_b_simple": bs,
            "exact_low": low, "exact_high": high, "split_b_simple": split.avg.b_simple,
            "split_interval": split.avg.interval(), "split_n": split.avg.n, "acc_b_simple": acc.avg.b_simple,
            "acc_interval": acc.avg.interval(), "acc_n": acc.avg.n, "group": group}


def gram(grads: list) -> np.ndarray:
    """The m x m matrix of dot products of the (half-precision) gradients, summed in float32 chunks."""
    m, size, chunk = len(grads), grads[0].numel(), 1 << 20
    out = np.zeros((m, m))
    for start in range(0, size, chunk):
        block = torch.stack([g[start:start + chunk].float() for g in grads])
        out += (block @ block.T).double().numpy()
    return out


def acc_stream(trainer, model, loader, params, acc, stub, passes: int, group: int) -> None:
    """`group` micro-batches per step at the same weights, fed to the meter as accumulation feeds it."""
    for h in acc._hooks:  # the accumulation stream needs no split
        h.remove()
    for _ in range(passes):
        for q in params:
            q.grad = None
        acc._reset_group()  # a pass's unfinished group is dropped with its gradients
        for j, batch in enumerate(loader, 1):
            acc.p.batch_size = _backward(trainer, model, batch)
            if j % group == 0:
                acc.before_step(stub)
                for q in params:
                    q.grad = None
            acc.on_train_batch_end(stub)
