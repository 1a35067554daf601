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
  trace cannot see it (CPU convolutions take none): CUDNN_WORKSPACE_BYTES (64 MiB)
  held from the start, plus a share of the training peak's activations that
  depends on the GPU's generation (memcauses.workspace_share): in reserved.
- the label assigner of the release that trains (settings.ultralytics): releases before 8.4.91
  built (batch, boxes, anchors) tensors in float32 and int64 that the installed one does not;
  the trace replays them (detector.yolo.assigners), so one traced family per assigner era.
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
from detector.yolo import assigners, fakerun, forked, memcauses as causes, memscale
from detector.yolo.allocator import CachingAllocator, round_size
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
    train_boxes: int = 4  # per training image, mosaic included: the densest batch of a typical epoch
    val_boxes: int = 1
    nbs: int = facts.NBS
    train_boxes_high: int | None = None  # the densest training batch the run can meet (None: train_boxes)
    val_boxes_high: int | None = None
    ultralytics: str = ""  # the version that trains ("" = the installed one): its cache rule and label assigner
    total_gb: float | None = None  # the GPU's memory: the "empty above a share of the GPU" rules (8.3.87 on)
    train_images: int = 0  # 0 = unknown: a batch larger than the dataset holds only the dataset
    val_images: int = 0
    gpu: str = ""  # the CUDA device's name ("" = unknown): its generation sets the cuDNN workspace share
    val_aspects: tuple = ()  # validation images' height / width (() = unknown: square, the largest shape)


@dataclass(frozen=True)
class MemoryPrediction:
    """Predicted GiB for one batch: reserved (what runs out) and allocated, training and validation at 2x.

    Typical figures assume the settings' box counts and the installed Ultralytics' cache rules; the
    `_high` figures are the worst epoch: the densest batches, shapes that change between batches
    (fragmentation), validation's cache where the release keeps it, and a large cuDNN workspace (see causes).
    """

    batch: int
    train_gb: float  # peak reserved during the training iterations
    val_gb: float  # peak reserved in validation at 2 x batch and the next epoch's training on its cache
    train_allocated_gb: float
    val_allocated_gb: float
    breakdown: dict = field(default_factory=dict)  # GiB at the training peak, by category
    seconds: float = 0.0
    later_gb: float = 0.0  # reserved at the end of the next epoch: training after validation (GPU_mem from epoch 2)
    train_gb_high: float = 0.0
    val_gb_high: float = 0.0
    causes: dict = field(default_factory=dict)  # GiB the worst peak adds to the typical, by cause (they sum to the gap)

    @property
    def peak_gb(self) -> float:
        return max(self.train_gb, self.val_gb, self.later_gb)

    @property
    def peak_gb_high(self) -> float:
        return max(self.train_gb_high, self.val_gb_high)


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
    """Predictions for one model and settings, any batch: the model is built once, traced twice, then rescaled."""

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
        self._families: dict = {}  # by assigner era (detector.yolo.assigners), optimizer and nbs: traced once each

    def trace(self, batch: int, boxes: int, val_boxes: int) -> fakerun.Trace:
        """One fake run: two training iterations and a validation batch at 2 x batch."""
        s = self.settings
        spec = fakerun.StepSpec(batch=batch, imgsz=s.imgsz, boxes=boxes, val_boxes=val_boxes, amp=s.amp,
                                optimizer=s.optimizer, nbs=s.nbs, ultralytics=s.ultralytics)
        with _quiet():
            return fakerun.run(self._prepared, spec, Planner(boxes, self._anchors), fake=True)

    def family(self) -> memscale.TraceFamily:
        """The two reference traces, made once per assigner era: every batch and box count is a rescaling of them."""
        s, b = self.settings, REFERENCE_BATCH
        key = assigners.era(s.ultralytics), s.optimizer, s.nbs  # what the two traces cannot rescale
        if key not in self._families:
            k, v = max(s.train_boxes, 1), max(s.val_boxes, 1)
            step = memscale.BATCH_STEP * b, memscale.BOX_STEP * k, memscale.BOX_STEP * v
            first, second = forked.both(self.trace, (b, k, v), step)  # on two cores where there are two
            self._families[key] = memscale.TraceFamily.from_traces(first, second, b, k, v)
        return self._families[key]

    def predict(self, batch: int, train_boxes: int | None = None, val_boxes: int | None = None) -> MemoryPrediction:
        """Typical and worst-case reserved GiB at `batch` (box counts default to the settings')."""
        s = self.settings
        started = time.perf_counter()
        fam = self.family()
        k, v = train_boxes or s.train_boxes, val_boxes or s.val_boxes
        kh, vh = max(s.train_boxes_high or k, k), max(s.val_boxes_high or v, v)
        b = min(batch, s.train_images) if s.train_images else batch
        vb = min(facts.val_batch(batch), s.val_images) if s.val_images else facts.val_batch(batch)
        typical = fam.events(b, k, v)
        # Validation runs rectangular batches (facts.val_batch_shape); its activations scale with the area,
        # as with the batch, so the largest batch is the square trace at a batch scaled by the area.
        height, width = facts.val_batch_shape(s.imgsz, s.val_aspects, vb)
        vb_area = vb * height * width / s.imgsz**2
        val = fam.events(vb_area / 2, k, v)
        rule = causes.cache_rule(s.ultralytics)
        total = s.total_gb * GIB if s.total_gb else None
        typ = simulate(fam.base, typical, val, typical, rule, total)
        dense = fam.events(b, kh, vh)
        dense_val = fam.events(vb_area / 2, kh, vh)
        # The worst epoch: typical batches first, then the densest ones, on the cache validation left (kept
        # unless the release empties it; what it keeps is fragmented by the changed shapes).
        worst = simulate(fam.base, typical, dense_val, dense, rule, total)
        workspace = causes.cudnn_workspace_high(fam.base, typical)
        act = (typ["breakdown"].get("activations", 0) + typ["breakdown"].get("loss", 0)) * GIB
        cudnn = causes.workspace_share(s.gpu) * act  # typical cuDNN workspaces, kept by the cache
        worst_extra = causes.WORST_EXTRA_SHARE * act
        t_high = (max(worst["again"], typ["train"]) + workspace + cudnn + worst_extra) / GIB
        v_high = (max(worst["val"], worst["again"], typ["val"], typ["again"]) + workspace + cudnn + worst_extra) / GIB
        # What the worst peak adds to the typical one, cause by cause: the parts sum to peak_gb_high - peak_gb.
        typical_peak = max(typ["train"], typ["val"], typ["again"])  # validation at 2x is in both figures
        denser = max(worst["val"], worst["again"], typical_peak) - typical_peak
        drivers = {"the densest batches and the shapes they change": denser / GIB,
                   "cuDNN workspace": workspace / GIB,
                   "workspace-hungry algorithms and an epoch's fragmentation": worst_extra / GIB}
        # The workspace is allocated while a convolution runs: in the allocated peak and its breakdown.
        breakdown = {**typ["breakdown"], "workspace": round(typ["breakdown"].get("workspace", 0) + cudnn / GIB, 4)}
        return MemoryPrediction(
            batch=batch, train_gb=(typ["train"] + cudnn) / GIB, val_gb=(max(typ["val"], typ["again"]) + cudnn) / GIB,
            train_allocated_gb=(typ["train_allocated"] + cudnn) / GIB, val_allocated_gb=(typ["val_allocated"] + cudnn) / GIB,
            breakdown=breakdown, seconds=round(time.perf_counter() - started, 2),
            later_gb=(typ["again"] + cudnn) / GIB, train_gb_high=t_high, val_gb_high=v_high,
            causes={k: round(x, 3) for k, x in drivers.items()})


REFERENCE_BATCH = 4  # the reference traces run at 4 and 8 images (validation 8 and 16)


def simulate(base, first: list, val: list | None, again: list, rule: str, total: float | None) -> dict:
    """One epoch and the start of the next through the caching allocator, as the trainer runs them.

    `first`, `val` and `again` are event lists aligned with `base` (a fakerun.Trace): the training
    iterations of epoch 1, the validation pass, and the training of the next epoch (its second
    iteration, replayed on the cache validation left). `rule` is when Ultralytics empties the cache
    (causes.cache_rule). Bytes: train/val peaks, reserved at the end ("again"), breakdown at the training peak.
    """
    alloc = CachingAllocator()
    alloc.malloc(-1, CUBLAS_WORKSPACE_BYTES)  # the handle's workspace, cached from the first matmul on
    alloc.malloc(-2, CUDNN_WORKSPACE_BYTES)
    end = base.val_start if base.val_start is not None else len(first)
    at_peak = _replay(alloc, first[:end], base, track=True)
    out = {"train": alloc.peak_reserved, "train_allocated": alloc.peak_allocated}
    breakdown = {k: round(v / GIB, 4) for k, v in at_peak.items()}
    breakdown["allocator_overhead"] = round((out["train"] - out["train_allocated"]) / GIB, 4)
    out["breakdown"] = breakdown
    alloc.reset_peak()
    if val is not None and base.val_start is not None:
        causes.empty_cache_if(alloc, rule, total, before_validation=True)
        _replay(alloc, val[end:], base)
    out["val"], out["val_allocated"] = alloc.peak_reserved, alloc.peak_allocated
    causes.empty_cache_if(alloc, rule, total, before_validation=False)
    alloc.reset_peak()
    start = base.iter2_start if base.iter2_start is not None else 0
    _replay(alloc, _next_epoch(base, again, start, end), base, offset=1 << 40)
    out["again"] = alloc.peak_reserved
    return out


def _replay(alloc, events, base, offset: int = 0, track: bool = False):
    """Feed events to the allocator; releases of storages this replay did not allocate are skipped.

    With `track`, also the live bytes per category at the allocated peak (the breakdown).
    """
    live = dict.fromkeys(CATEGORIES, 0)
    live["workspace"] = alloc.allocated
    sizes, cats, best, at_peak = {}, {}, -1, dict(live)
    for nbytes, sid, phase in events:
        key = sid + offset
        if nbytes > 0:
            alloc.malloc(key, nbytes)
            cat = ("gradients" if sid in base.grads else "optimizer_state" if sid in base.state
                   else _PHASES.get(phase, "other"))
            sizes[key], cats[key] = round_size(nbytes), cat
            live[cat] += sizes[key]
            if track and alloc.allocated > best:
                best, at_peak = alloc.allocated, dict(live)
        elif key in sizes:
            live[cats.pop(key)] -= sizes.pop(key)
            alloc.free(key)
    return at_peak


def _next_epoch(base, again: list, start: int, end: int) -> list:
    """The next epoch's iteration: gradients that the traced iteration accumulated into exist again first."""
    own = {sid for n, sid, _ in again[start:end] if n > 0}
    size = {sid: n for n, sid, _ in again[:start] if n > 0 and sid in base.grads and sid not in own}
    return [(n, sid, "backward") for sid, n in size.items()] + again[start:end]


class _quiet:
    """Ultralytics logs its optimizer choice on every build; the memory model builds one per batch."""

    def __enter__(self):
        self._logger = logging.getLogger("ultralytics")
        self._level = self._logger.level
        self._logger.setLevel(logging.WARNING)

    def __exit__(self, *exc):
        self._logger.setLevel(self._level)
        return False
