"""Measured GPU memory of real training steps and the validation pass per candidate batch (CUDA only)."""

from __future__ import annotations

import torch
from ultralytics.cfg import DEFAULT_CFG

from detector import facts
from detector.errors import UsageError
from detector.yolo.hermetic import offline_check_amp
from detector.yolo.recording import is_out_of_memory, release_device_memory


def cuda_devices(device: str | None) -> list[dict]:
    """Index, name, total memory and memory already in use (CUDA context, other processes) per GPU named."""
    ids = [int(x) for x in str(device or "0").replace("cuda:", "").split(",") if x.strip()]
    out = []
    for i in ids:
        free, total = torch.cuda.mem_get_info(i)  # creates the context, so its memory is counted below
        outside = max(total - free - torch.cuda.memory_reserved(i), 0)
        out.append({"index": i, "name": torch.cuda.get_device_name(i), "total_memory_gb": total / 2**30,
                    "baseline_gb": outside / 2**30})
    return out


def probe_batch_memory(model_spec: str, nc: int, imgsz: int, candidates, device_index: int = 0,
                       train_labels: int = 1, val_labels: int = 1, amp=True, stop_above_gb: float | None = None,
                       val_aspects=()):
    """Peak CUDA memory of real training steps and of a validation pass, per candidate batch (CUDA only).

    Candidates run in ascending order and the probe stops at the first out-of-memory error, or
    once a peak exceeds stop_above_gb (memory grows with the batch, so larger ones cannot fit),
    so a candidate that does not fit costs one failed step. The model is built here and thrown
    away; the training that follows builds its own. Returns per probed batch a dict of
    `batch`, `train_peak_gb`, `val_peak_gb`, `allocated_peak_gb` and `oom` (the phase that ran out, or None).
    Validation runs in the largest of the rectangular batches Ultralytics forms from images of these
    height / width ratios (facts.val_batch_shape; none: square images, the largest).
    """
    if not torch.cuda.is_available():
        raise UsageError("the batch-size probe measures GPU memory and needs a CUDA device; on CPU --batch auto is 16")
    device = torch.device("cuda", device_index)
    release_device_memory()
    try:
        return _probe_candidates(model_spec, nc, imgsz, candidates, device, train_labels, val_labels, amp,
                                 stop_above_gb, val_aspects)
    finally:
        release_device_memory()
        torch.cuda.reset_peak_memory_stats(device)


class _ProbeModel:
    """The model, its EMA copy, optimizer and grad scaler as the trainer holds them during training."""

    def __init__(self, model_spec: str, nc: int, device, amp):
        import copy

        from ultralytics.cfg import get_cfg
        from ultralytics.nn.tasks import DetectionModel, load_checkpoint

        cfg = load_checkpoint(model_spec)[0].yaml if str(model_spec).endswith(".pt") else model_spec
        self.model = DetectionModel(cfg, nc=nc, verbose=False).to(device)
        self.model.args = get_cfg(DEFAULT_CFG)  # the loss reads its gains (box, cls, dfl) from here
        self.ema = copy.deepcopy(self.model).eval()  # validation runs on Ultralytics' EMA copy
        self.nc, self.device = nc, device
        use = amp not in {False, "fp32"} and device.type == "cuda" and offline_check_amp(self.model)  # as the trainer
        self.amp = torch.bfloat16 if use and amp == "bf16" else use
        # AdamW keeps two state tensors per weight, SGD one: probing with AdamW covers either choice.
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-4)
        self.scaler = torch.amp.GradScaler(device.type, enabled=bool(self.amp) and amp != "bf16")

    def batch(self, n: int, shape: tuple[int, int], labels: int, half: bool = False) -> dict:
        """A synthetic batch as preprocess_batch leaves it: (height, width) images in [0, 1], `labels` boxes on each."""
        labels = max(labels, 1)
        k, d = n * labels, self.device
        img = torch.rand(n, 3, *shape, device=d)
        boxes = torch.cat([torch.rand(k, 2, device=d) * 0.8 + 0.1, torch.rand(k, 2, device=d) * 0.1 + 0.02], 1)
        return {"img": img.half() if half else img, "bboxes": boxes,
                "cls": torch.randint(0, self.nc, (k, 1), device=d).float(),
                "batch_idx": torch.arange(n, device=d).repeat_interleave(labels).float()}

    def train_steps(self, n: int, imgsz: int, labels: int, steps: int = 2) -> None:
        """Forward, loss, backward and optimizer step, as the trainer runs them (AMP included)."""
        from ultralytics.utils.torch_utils import autocast

        self.model.train()
        for _ in range(steps):  # the second step runs with the optimizer state the first one created
            batch = self.batch(n, (imgsz, imgsz), labels)  # mosaics: square
            with autocast(self.amp, device=self.device.type):
                loss, _ = self.model(batch)
            self.scaler.scale(loss.sum()).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.optimizer.zero_grad()
            del batch, loss

    def validate(self, n: int, shape: tuple[int, int], labels: int) -> None:
        """The validator's pass in training (8.4): fp16 images, fp32 EMA under autocast, validation loss, NMS."""
        from ultralytics.utils import nms
        from ultralytics.utils.torch_utils import autocast

        half = bool(self.amp) and self.device.type == "cuda"
        model = self.ema.float()
        with torch.inference_mode():
            batch = self.batch(n, shape, labels, half=half)
            with autocast(half, device=self.device.type):
                preds = model(batch["img"])
                model.loss(batch, preds)
            nms.non_max_suppression(preds, 0.001, 0.7, multi_label=True, max_det=300,
                                    end2end=getattr(model, "end2end", False))


def _probe_candidates(model_spec, nc, imgsz, candidates, device, train_labels, val_labels, amp, stop_above_gb,
                      val_aspects=()):
    """The probe's loop, device-agnostic so its steps can be exercised on CPU; peaks are None off CUDA."""
    probe = _ProbeModel(model_spec, nc, device, amp)
    out = []
    for b in sorted(candidates):
        phase, peaks = "training", {}
        try:
            _reset_peak(device)
            probe.train_steps(b, imgsz, train_labels)
            peaks["train_peak_gb"], allocated = _peak_gb(device)
            phase = "validation"
            _reset_peak(device)
            n = facts.val_batch(b)  # Ultralytics validates at twice the batch, in rectangular batches
            probe.validate(n, facts.val_batch_shape(imgsz, val_aspects, n), val_labels)
            peaks["val_peak_gb"], val_allocated = _peak_gb(device)
            peaks["allocated_peak_gb"] = None if allocated is None else max(allocated, val_allocated)
            phase = None
        except RuntimeError as e:
            if not is_out_of_memory(e):
                raise
        if phase:  # out of memory: free the failed step's tensors, keep what was measured
            probe.optimizer.zero_grad()
            probe.ema.float()
            release_device_memory()
        out.append({"batch": b, "oom": phase, **peaks})
        peak = max((v for k, v in peaks.items() if k != "allocated_peak_gb" and v is not None), default=None)
        if phase or (stop_above_gb is not None and peak is not None and peak > stop_above_gb):
            break
    return out


def _reset_peak(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def _peak_gb(device) -> tuple[float | None, float | None]:
    """Peak reserved (what actually runs out: tensors plus the allocator's cache) and allocated GiB since the reset."""
    if device.type != "cuda":
        return None, None
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_reserved(device) / 2**30, torch.cuda.max_memory_allocated(device) / 2**30
