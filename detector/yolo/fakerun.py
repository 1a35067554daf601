"""One training's GPU work replayed op by op on the CPU: two training iterations, then a validation batch.

The steps mirror Ultralytics 8.4's trainer and validator (the same model, loss,
optimizer construction, gradient clipping and EMA update), so the allocation trace
is the trainer's. With `fake=True` every tensor is a FakeTensor (shapes and dtypes,
no data, no arithmetic), which makes a yolo11x step at 640 cost seconds; with
`fake=False` the same steps run for real on the CPU, which is how the fake run is
checked. The model is built normally and then moved into the fake mode, because
building inside it fails on the stride probe (DataDependentOutputException).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from types import SimpleNamespace

import torch

from detector import facts
from detector.yolo import assigners
from detector.yolo.tracking import CudaAutocast, Planner, StorageTracker

AMP_DTYPES = {"on": torch.float16, "bf16": torch.bfloat16, "off": None}
OPTIMIZERS = {"SGD", "Adam", "AdamW", "NAdam", "RAdam", "Adamax", "RMSprop"}


@dataclass
class StepSpec:
    """What one fake (or real) run does: batch, image size, boxes per image and the training settings."""

    batch: int
    imgsz: int
    boxes: int  # per training image (mosaic included)
    val_boxes: int  # per validation image
    amp: str = "on"  # "on" (fp16), "bf16" or "off"
    optimizer: str = "AdamW"
    nbs: int = facts.NBS
    val: bool = True
    ultralytics: str = ""  # the release whose label assigner the loss replays (detector.yolo.assigners)


@dataclass
class Trace:
    """The tracker's log and the storages that turned out to be gradients and optimizer state."""

    events: list = field(default_factory=list)  # (bytes, storage id, phase); bytes < 0 is a release
    val_start: int | None = None  # index of the first validation event
    iter2_start: int | None = None  # index of the first event of the second training iteration
    grads: set = field(default_factory=set)
    state: set = field(default_factory=set)


def build_model(model_spec: str, nc: int):
    """The DetectionModel a training builds (yaml name or .pt), with Ultralytics' default hyperparameters."""
    from ultralytics.cfg import DEFAULT_CFG, get_cfg
    from ultralytics.nn.tasks import DetectionModel, load_checkpoint

    cfg = load_checkpoint(model_spec)[0].yaml if str(model_spec).endswith(".pt") else model_spec
    model = DetectionModel(cfg, nc=nc, verbose=False)
    model.args = get_cfg(DEFAULT_CFG)  # the loss reads its gains (box, cls, dfl) from here
    return model


def anchors_per_box(imgsz: int, strides, box_fraction: float) -> int:
    """Anchor centres inside a square box of side box_fraction x imgsz, summed over the detection levels."""
    return max(sum(round(box_fraction * imgsz / float(s)) ** 2 for s in strides), 1)


class Prepared:
    """A model and its EMA copy moved into a fake mode (or kept real), reusable for any number of runs.

    Fake ops change nothing, so the same fake weights serve every batch size: the
    deep copies and the conversion, a third of a run's time, happen once.
    """

    def __init__(self, model, fake: bool = True, cache: bool = True):
        from torch._subclasses.fake_tensor import FakeTensorMode

        self.mode = FakeTensorMode(allow_non_fake_inputs=True) if fake else None
        if self.mode is not None:
            self.mode.cache_enabled = cache
        self.model, self.ema = _into_mode(model, self.mode)  # deepcopy of real tensors runs outside the fake mode

    def reset(self) -> None:
        """Forget what a run left: gradients and the loss criteria (rebuilt on first use, as a new trainer does)."""
        for m in (self.model, self.ema):
            m.zero_grad(set_to_none=True)
            m.criterion = None


def run(prepared: Prepared | object, spec: StepSpec, planner: Planner | None, fake: bool = True) -> Trace:
    """Trace two training iterations (the second with optimizer state) and one validation batch at 2 x batch."""
    if not isinstance(prepared, Prepared):
        prepared = Prepared(prepared, fake)
    prepared.reset()
    model, ema, mode = prepared.model, prepared.ema, prepared.mode
    tracker = StorageTracker(planner)
    with (mode if mode is not None else _nothing()), assigners.replaying(spec.ultralytics):
        tracker.adopt(_tensors(model), "weights")
        tracker.adopt(_tensors(ema), "ema")
        with tracker:
            out, optimizer = _train(model, ema, spec, tracker, planner)
            if spec.val:  # the optimizer and its state stay alive through validation, as in the trainer
                out.val_start = len(tracker.trace)
                _validate(ema, spec, tracker, planner)
            del optimizer
    prepared.reset()
    tracker.close()
    out.events = tracker.trace
    return out


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _tensors(module):
    return [t for t in (*module.parameters(), *module.buffers())]


def _into_mode(model, mode):
    """A training copy of the model and its EMA copy, their tensors fake when mode is a FakeTensorMode."""
    model = copy.deepcopy(model)
    ema = copy.deepcopy(model).eval()
    for p in ema.parameters():
        p.requires_grad_(False)  # as ModelEMA
    if mode is not None:
        for m in (model, ema):
            for sub in m.modules():
                for name, p in list(sub._parameters.items()):
                    if p is not None:
                        sub._parameters[name] = torch.nn.Parameter(mode.from_tensor(p.detach()), p.requires_grad)
                for name, b in list(sub._buffers.items()):
                    if b is not None:
                        sub._buffers[name] = mode.from_tensor(b)
    return model.train(), ema


def _optimizer(model, name: str):
    """Ultralytics' optimizer for the model (its parameter groups), foreach as PyTorch picks on CUDA."""
    from ultralytics.engine.trainer import BaseTrainer

    shim = SimpleNamespace(args=SimpleNamespace(lr0=0.01, optimizer=name), data={"nc": 80})
    opt = BaseTrainer.build_optimizer(shim, model, name=name, lr=0.001, momentum=0.9, decay=5e-4)
    for group in opt.param_groups:
        group["foreach"] = True  # PyTorch's default for CUDA tensors; fake CPU ones would get the for-loop
    return opt


def _batch(n: int, imgsz: int, boxes: int, nc: int, half: bool = False) -> dict:
    """A batch as preprocess_batch leaves it on the device: uint8 images made float in [0, 1], labels."""
    k = n * boxes
    img = torch.randint(0, 255, (n, 3, imgsz, imgsz), dtype=torch.uint8)
    img = (img.half() if half else img.float()) / 255
    xy, wh = torch.rand(k, 2) * 0.8 + 0.1, torch.rand(k, 2) * 0.1 + 0.02
    return {"img": img, "bboxes": torch.cat([xy, wh], 1), "cls": torch.randint(0, nc, (k, 1)).float(),
            "batch_idx": torch.arange(n).repeat_interleave(boxes).float()}


def _train(model, ema, spec: StepSpec, tracker: StorageTracker, planner):
    """Two iterations as BaseTrainer._do_train runs them: forward and loss under autocast, backward, step, EMA."""
    from ultralytics.utils.torch_utils import unwrap_model

    dtype = AMP_DTYPES[spec.amp]
    tracker.phase = "optimizer"
    opt = _optimizer(model, spec.optimizer)
    nc = unwrap_model(model).model[-1].nc
    out = Trace()
    # With accumulation (batch below nbs) gradients live on from the iteration before: the second
    # iteration starts with them. At batch >= nbs every iteration steps and zeroes them first.
    keep_grads = facts.accumulate(spec.batch, spec.nbs) > 1
    pairs = ema_pairs(ema, model)
    for it in range(2):
        if it == 1:
            out.iter2_start = len(tracker.trace)
        if planner is not None:
            planner.stage, planner.boxes = "loss", spec.boxes
        tracker.phase = "batch"
        batch = _batch(spec.batch, spec.imgsz, spec.boxes, nc)
        tracker.phase = "forward"
        with CudaAutocast(dtype or torch.float16, enabled=dtype is not None):
            preds = model(batch["img"])  # model(batch) runs these two calls; split to label the loss's memory
            tracker.phase = "loss"
            loss, _ = model.loss(batch, preds)
            del preds
        tracker.phase = "backward"
        loss.sum().backward()
        del batch, loss
        if it == 1:
            out.grads = {tracker.storage_id(p.grad) for p in model.parameters() if p.grad is not None}
        tracker.phase = "step"
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=10.0)
        opt.step()
        if it == 1 or not keep_grads:
            opt.zero_grad()
        tracker.phase = "ema"
        _ema_update(ema, model, pairs)
    out.state = {tracker.storage_id(t) for s in opt.state.values() for t in s.values() if isinstance(t, torch.Tensor)}
    return out, opt


def ema_pairs(ema, model) -> tuple[list, list]:
    """ModelEMA's lists of (EMA tensor, model tensor), built once from the state dicts as it does."""
    msd = model.state_dict()
    pairs = [(v, msd[k]) for k, v in ema.state_dict().items() if v.dtype.is_floating_point]
    return [v for v, _ in pairs], [m for _, m in pairs]


def _ema_update(ema, model, pairs) -> None:
    """ModelEMA.update: one foreach lerp of the EMA's float tensors towards the model's."""
    with torch.no_grad():
        torch._foreach_lerp_(pairs[0], pairs[1], 1 - 0.9999)


def _validate(ema, spec: StepSpec, tracker: StorageTracker, planner) -> None:
    """The validator during training: fp16 images, fp32 EMA under autocast, validation loss, then NMS."""
    import torchvision  # noqa: F401  (a training has it loaded, so NMS takes torchvision's kernel, as here)
    from ultralytics.utils import nms

    # The validator enables autocast at its default dtype (fp16) and halves the images whenever the
    # trainer used AMP, bf16 or not.
    dtype = torch.float16 if AMP_DTYPES[spec.amp] is not None else None
    n = facts.val_batch(spec.batch)
    # no_grad, not the validator's inference_mode: the same storages, but under inference_mode the
    # head's scalar stride reaches the fake mode as a data-dependent read the planner cannot answer.
    with torch.no_grad():
        if planner is not None:  # the validation images carry their own (unaugmented) box counts
            planner.stage, planner.boxes = "loss", max(spec.val_boxes, 1)
        tracker.phase = "val_batch"
        nc = ema.model[-1].nc
        batch = _batch(n, spec.imgsz, spec.val_boxes, nc, half=dtype is not None)
        tracker.phase = "val_forward"
        with CudaAutocast(dtype or torch.float16, enabled=dtype is not None):
            preds = ema(batch["img"])
            tracker.phase = "val_loss"
            ema.loss(batch, preds)
        tracker.phase = "nms"
        if planner is not None:
            planner.stage = "nms"
        # NMS runs image by image and every image costs the same: two images show its memory in a tenth
        # of the time of all of them.
        first = (preds[0][:2], preds[1]) if isinstance(preds, tuple) else preds[:2]
        nms.non_max_suppression(first, 0.001, 0.7, multi_label=True, max_det=300,
                                end2end=getattr(ema, "end2end", False))


def level_strides(model) -> list[float]:
    """The detection head's strides (8, 16, 32 for YOLO11)."""
    return [float(s) for s in model.model[-1].stride.tolist()]
