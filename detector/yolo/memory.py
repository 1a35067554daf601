"""GPU memory of a training without a GPU: the peak reserved GiB of training and of its validation pass.

The trainer's own steps (detector.yolo.fakerun) run on fake tensors while a
tracker logs every storage (detector.yolo.tracking); the log is replayed through a
model of PyTorch's caching allocator (detector.yolo.allocator), whose reserved
memory is what `torch.cuda.memory_reserved()` reports and what runs out. Terms a
CPU cannot see are added and stated:

- cuBLAS workspace: one per handle, allocated through the caching allocator on the
  first matmul and kept (PyTorch 2.x default 8 MiB + 1 MiB cuBLASLt): in reserved.
- cuDNN workspace: each convolution borrows scratch memory from the caching
  allocator and returns it, and the cache keeps the block for the next one. The
  trace cannot see it (CPU convolutions take none), so it is a stated assumption:
  CUDNN_WORKSPACE_BYTES (64 MiB) held from the start, about what the heuristic
  (non-benchmark, deterministic) algorithms Ultralytics' defaults select ask for: in reserved.
- CUDA context (driver, kernels, cuDNN/cuBLAS code): outside reserved, CUDA_CONTEXT_GB,
  what a recent driver with lazy module loading uses for PyTorch on an Ampere or newer GPU.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from detector import facts
from detector.config import DEFAULT_MODEL
from detector.errors import ModelError, UsageError
from detector.yolo import fakerun
from detector.yolo.allocator import CachingAllocator
from detector.yolo.tracking import Planner

GIB = 2**30
CUDA_CONTEXT_GB = 0.5  # GiB outside the allocator: CUDA context with lazy loading, cuDNN and cuBLAS kernels
CUBLAS_WORKSPACE_BYTES = 8519680 + 1048576  # PyTorch's default cuBLAS workspace per handle, plus cuBLASLt's
CUDNN_WORKSPACE_BYTES = 64 * 2**20  # the largest cuDNN scratch block the cache keeps (see module docstring)
BOX_FRACTION = 0.1  # assumed box side as a share of the image side: sets how many anchors fall inside a box
CATEGORIES = ("weights", "gradients", "optimizer_state", "activations", "loss", "workspace", "other")
_PHASES = {"weights": "weights", "ema": "weights", "batch": "activations", "forward": "activations",
           "backward": "activations", "val_batch": "activations", "val_forward": "activations", "loss": "loss",
           "val_loss": "loss", "nms": "loss"}


@dataclass(frozen=True)
class MemorySettings:
    """What the memory of a training depends on besides the batch."""

    model: str = DEFAULT_MODEL
    nc: int = 80
    imgsz: int = 640
    amp: str = "on"  # "on" (fp16), "bf16" or "off"
    optimizer: str = "AdamW"  # SGD keeps one state tensor per weight, the Adam family two
    train_boxes: int = 4  # per training image, mosaic included
    val_boxes: int = 1
    nbs: int = facts.NBS


@dataclass(frozen=True)
class MemoryPrediction:
    """Predicted GiB for one batch: reserved (what runs out) and allocated, training and validation at 2x."""

    batch: int
    train_gb: float  # peak reserved during the training iterations
    val_gb: float  # peak reserved during validation at 2 x batch (the cache training left included)
    train_allocated_gb: float
    val_allocated_gb: float
    breakdown: dict = field(default_factory=dict)  # GiB at the training peak, by category
    seconds: float = 0.0

    @property
    def peak_gb(self) -> float:
        return max(self.train_gb, self.val_gb)


def parse_amp(value) -> str:
    """amp=true/false/bf16 (as Ultralytics takes it) to "on", "off" or "bf16"."""
    text = str(value).strip().lower()
    if text in {"true", "1", "on", "yes", "fp16"}:
        return "on"
    if text in {"false", "0", "off", "no", "fp32", "none"}:
        return "off"
    if text == "bf16":
        return "bf16"
    raise UsageError(f"amp must be true, false or bf16, not {value!r}")


def parse_optimizer(value) -> str:
    """Ultralytics' optimizer name; 'auto' counts as AdamW, the larger of what auto picks (AdamW or MuSGD)."""
    text = str(value or "auto").strip()
    if text.lower() == "auto":
        return "AdamW"
    names = {n.lower(): n for n in fakerun.OPTIMIZERS}
    if text.lower() not in names:
        raise UsageError(f"optimizer must be one of auto, {', '.join(sorted(fakerun.OPTIMIZERS))} for the memory "
                         f"model, not {value!r}")
    return names[text.lower()]


class MemoryModel:
    """Predictions for one model and settings, any batch: the model is built once and reused."""

    def __init__(self, settings: MemorySettings):
        self.settings = settings
        try:
            with _quiet():
                self._model = fakerun.build_model(settings.model, settings.nc)
        except (FileNotFoundError, OSError, KeyError, ValueError, AttributeError) as e:
            raise ModelError(f"cannot build model {settings.model!r} for the memory model: {e}; use a model YAML "
                             "name such as yolo11n.yaml or a local .pt file") from e
        strides = fakerun.level_strides(self._model)
        self._anchors = fakerun.anchors_per_box(settings.imgsz, strides, BOX_FRACTION)
        self._prepared = fakerun.Prepared(self._model, fake=True)

    def predict(self, batch: int) -> MemoryPrediction:
        """Trace two training iterations and one validation batch at `batch` on fake tensors, then replay them."""
        s = self.settings
        started = time.perf_counter()
        spec = fakerun.StepSpec(batch=batch, imgsz=s.imgsz, boxes=s.train_boxes, val_boxes=s.val_boxes, amp=s.amp,
                                optimizer=s.optimizer, nbs=s.nbs)
        with _quiet():
            trace = fakerun.run(self._prepared, spec, Planner(s.train_boxes, self._anchors), fake=True)
        return replay(trace, batch, time.perf_counter() - started)


def replay(trace: fakerun.Trace, batch: int, seconds: float = 0.0) -> MemoryPrediction:
    """Reserved and allocated peaks of a trace through the caching allocator, and the breakdown at the training peak."""
    alloc = CachingAllocator()
    alloc.malloc(-1, CUBLAS_WORKSPACE_BYTES)  # the handle's workspace, cached from the first matmul on
    alloc.malloc(-2, CUDNN_WORKSPACE_BYTES)
    live = dict.fromkeys(CATEGORIES, 0)
    live["workspace"] = alloc.allocated
    sizes, cats = {}, {}
    best, at_peak = -1, dict(live)
    end = trace.val_start if trace.val_start is not None else len(trace.events)
    train = None
    for i, (nbytes, sid, phase) in enumerate(trace.events):
        if i == end:
            train = (alloc.peak_reserved, alloc.peak_allocated)
            alloc.reset_peak()
        if nbytes > 0:
            cat = ("gradients" if sid in trace.grads else "optimizer_state" if sid in trace.state
                   else _PHASES.get(phase, "other"))
            sizes[sid], cats[sid] = nbytes, cat
            live[cat] += nbytes
            alloc.malloc(sid, nbytes)
            if i < end and alloc.allocated > best:
                best, at_peak = alloc.allocated, dict(live)
        else:
            live[cats.pop(sid)] -= sizes.pop(sid)
            alloc.free(sid)
    if train is None:
        train = (alloc.peak_reserved, alloc.peak_allocated)
        alloc.reset_peak()
    breakdown = {k: round(v / GIB, 4) for k, v in at_peak.items()}
    breakdown["allocator_overhead"] = round((train[0] - train[1]) / GIB, 4)
    return MemoryPrediction(batch=batch, train_gb=train[0] / GIB, val_gb=alloc.peak_reserved / GIB,
                            train_allocated_gb=train[1] / GIB, val_allocated_gb=alloc.peak_allocated / GIB,
                            breakdown=breakdown, seconds=round(seconds, 2))


class _quiet:
    """Ultralytics logs its optimizer choice on every build; the memory model builds one per batch."""

    def __enter__(self):
        self._logger = logging.getLogger("ultralytics")
        self._level = self._logger.level
        self._logger.setLevel(logging.WARNING)

    def __exit__(self, *exc):
        self._logger.setLevel(self._level)
        return False
