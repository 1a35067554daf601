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
- the meter's estimates fed with the same kind of gradients, with no weight update in
  between: consecutive pairs (accumulate = 1) and accumulation groups.

The model's BatchNorm running statistics are restored afterwards and .grad cleared.
"""

from __future__ import annotations

from types import SimpleNamespace

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


def _meter(trainer, model, loader) -> tuple[GradNoise, SimpleNamespace]:
    stub = SimpleNamespace(model=model, train_loader=loader, world_size=1, scaler=None, epoch=0)
    meter = GradNoise(Progress())
    meter.on_pretrain_routine_end(stub)
    meter.on_train_epoch_start(stub)
    return meter, stub


def measure(trainer, loader, passes: int = 4, group: int = 4) -> dict:
    """Exhaustive |G|², tr(Σ), B_simple at the trainer's current weights, and the meter's two estimates."""
    model = trainer.model.module if hasattr(trainer.model, "module") else trainer.model
    saved = {k: v.clone() for k, v in model.state_dict().items() if "running_" in k or "num_batches" in k}
    params, n = _params(model), len(loader.dataset)
    model.train()
    pair, pair_stub = _meter(trainer, model, loader)
    acc, acc_stub = _meter(trainer, model, loader)
    total, sq, m, nominal = None, 0.0, 0, None
    try:
        for _ in range(passes):  # accumulate = 1 stream: every batch from zero grads; also feeds the reference
            for batch in loader:
                for q in params:
                    q.grad = None
                b = _backward(trainer, model, batch)
                nominal = nominal or b
                pair.p.batch_size = b
                pair.before_step(pair_stub)
                pair.on_train_batch_end(pair_stub)
                if b == nominal:  # a short last batch would weigh differently in the partition
                    g = _flat(params) / b
                    total = g if total is None else total + g
                    sq += float(g.dot(g))
                    m += 1
        for _ in range(passes):  # accumulation stream: `group` micro-batches per step, same weights
            for q in params:
                q.grad = None
            acc._reset_group()  # a pass's unfinished group is dropped with its gradients
            for j, batch in enumerate(loader, 1):
                acc.p.batch_size = _backward(trainer, model, batch)
                if j % group == 0:
                    acc.before_step(acc_stub)
                    for q in params:
                        q.grad = None
                acc.on_train_batch_end(acc_stub)
    finally:
        for q in params:
            q.grad = None
        model.load_state_dict(saved, strict=False)
    mean = total / m
    g2, trace, bs = exhaustive(sq / m, float(mean.dot(mean)), nominal, m)
    return {"images": n, "batch": nominal, "batches": m, "exact_g2": g2, "exact_trace": trace, "exact_b_simple": bs,
            "pair_b_simple": pair.avg.b_simple, "pair_g2": pair.avg.g2, "pair_trace": pair.avg.trace,
            "pair_n": pair.avg.n, "acc_b_simple": acc.avg.b_simple, "acc_n": acc.avg.n, "group": group}
