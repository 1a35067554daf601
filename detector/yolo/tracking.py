"""Counting the bytes a PyTorch program allocates, op by op, without a GPU.

`StorageTracker` is a TorchDispatchMode that sees every ATen op below autograd and
logs each new storage an op returns (rounded up to 512 bytes, as CUDA's caching
allocator rounds every request) and its release when the storage dies. It works
the same on real CPU tensors and on fake ones, which is how the memory model is
checked: the same tracker, once on a real CPU run and once on a fake run, must give
the same peak. `CudaAutocast` is a TorchFunctionMode that applies CUDA autocast's
cast rules to CPU tensors, because fake CUDA tensors cannot run backward on a CPU
build of PyTorch (pytorch#92627). `Planner` answers the data-dependent ops of the
loss and NMS (how many boxes, how many anchors inside them) that fake tensors
cannot compute.
"""

from __future__ import annotations

import math
import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map

from detector.yolo.allocator import round_size

aten = torch.ops.aten


_FRESH: dict = {}


def _fresh_returns(func) -> list[bool]:
    """Per return of an op, whether it is a new tensor (no alias annotation: not a view, not in place, not out=)."""
    hit = _FRESH.get(func)
    if hit is None:
        schema = getattr(func, "_schema", None)
        hit = _FRESH[func] = [] if schema is None else [r.alias_info is None for r in schema.returns]
    return hit


class StorageTracker(TorchDispatchMode):
    """Logs every new storage (+bytes, id, phase) and every release (-bytes, id) in program order.

    Phases label allocations for the breakdown: set `tracker.phase` around forward,
    loss, backward, optimizer step and EMA update. Storages that already exist
    (weights) are registered with `adopt`.
    """

    def __init__(self, planner: Planner | None = None):
        super().__init__()
        self.trace: list[tuple[int, int, str]] = []  # (bytes, storage id, phase); bytes < 0 is a release
        self.live = self.peak = 0
        self.phase = "other"
        self.planner = planner
        self._ids: dict[int, int] = {}  # id(storage object) -> storage id, while it lives
        self._finalizers: dict[int, weakref.finalize] = {}
        self._next = 0

    def adopt(self, tensors, phase: str) -> None:
        """Count tensors that exist before tracking starts (the model's weights) as allocated now."""
        for t in tensors:
            self._track(t, phase)

    def storage_id(self, t: torch.Tensor) -> int | None:
        """The tracker's id of a tensor's storage, or None when the tracker never saw it."""
        return self._ids.get(id(t.untyped_storage()))

    def _track(self, t, phase: str) -> None:
        if not isinstance(t, torch.Tensor) or t.device.type == "meta":
            return
        storage = t.untyped_storage()
        key = id(storage)
        if key in self._ids:
            return
        size = round_size(storage.nbytes())
        if size == 0:  # an empty tensor allocates nothing on CUDA either
            return
        sid, self._next = self._next, self._next + 1
        self._ids[key] = sid
        self.trace.append((size, sid, phase))
        self.live += size
        self.peak = max(self.peak, self.live)
        self._finalizers[sid] = weakref.finalize(storage, self._release, key, sid, size)

    def close(self) -> None:
        """Stop watching what is still alive (the weights), so a finished trace is not kept or appended to."""
        for f in self._finalizers.values():
            f.detach()
        self._finalizers.clear()
        self._ids.clear()

    def _release(self, key: int, sid: int, size: int) -> None:
        self._finalizers.pop(sid, None)
        if self._ids.get(key) == sid:
            del self._ids[key]
        self.trace.append((-size, sid, ""))
        self.live -= size

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        answer = self.planner.answer(func, args, kwargs) if self.planner and _asks(func) else NotImplemented
        out = func(*args, **kwargs) if answer is NotImplemented else answer
        fresh = _fresh_returns(func)
        outs = out if isinstance(out, (tuple, list)) and len(fresh) > 1 else (out,)
        for i, o in enumerate(outs):
            if i < len(fresh) and fresh[i]:
                for t in tree_flatten(o)[0]:
                    self._track(t, self.phase)
        return out


class Planner:
    """Planned answers for the data-dependent ops fake tensors cannot compute.

    `boxes` is the boxes per image (every image of the batch padded to it, as the
    loss does), `anchors_per_box` how many anchor centres fall inside one box (the
    assigner's candidates), `topk` the assigner's positives per box. In NMS every
    anchor passes the 0.001 confidence threshold of an untrained model, in every class.
    """

    def __init__(self, boxes: int, anchors_per_box: int, topk: int = 10, max_nms: int = 30000, max_det: int = 300):
        self.boxes, self.anchors_per_box, self.topk = boxes, anchors_per_box, topk
        self.max_nms, self.max_det = max_nms, max_det
        self.stage = "loss"  # "loss" or "nms": which code asks

    def answer(self, func, args, kwargs):
        """The planned output of a data-dependent op, or NotImplemented to run the op itself."""
        if func is aten._local_scalar_dense.default:
            return self._scalar(args[0])
        if func is aten.nonzero.default:
            return self._nonzero(args[0], self._count(tuple(args[0].shape)))
        if func is aten._unique2.default:
            return self._unique(args[0], self._unique_count(args[0]), *args[1:], **kwargs)
        if func is aten.index.Tensor and any(_is_mask(i) for i in args[1]):
            idx = []
            for i in args[1]:
                idx += list(self._nonzero(i, self._count(tuple(i.shape))).unbind(1)) if _is_mask(i) else [i]
            return func(args[0], idx)
        if _is_nms(func):
            return torch.empty(self._kept(args[0].shape[0]), dtype=torch.long, device=args[0].device)
        return NotImplemented

    def _scalar(self, t):
        return True if t.dtype == torch.bool else (self.boxes if not t.dtype.is_floating_point else 1.0)

    def _count(self, shape) -> int:
        total = math.prod(shape)
        if self.stage == "nms":  # every anchor and class passes an untrained model's 0.001 threshold
            return min(total, self.max_nms) if len(shape) == 2 else total
        if len(shape) == 3:  # (batch, boxes, anchors): anchor centres inside each box
            return min(shape[0] * self.boxes * self.anchors_per_box, total)
        if len(shape) == 2:  # (batch, anchors): the assigner's positive anchors
            return min(shape[0] * self.boxes * self.topk, total)
        return total

    def _unique_count(self, t) -> int:
        # Only the loss asks, for the images of the batch (every image carries boxes).
        return max(len(t) // max(self.boxes, 1), 1) if self.stage == "loss" else len(t)

    def _kept(self, n: int) -> int:
        return min(n, self.max_det)

    @staticmethod
    def _nonzero(t, count: int):
        return torch.empty(count, t.dim(), dtype=torch.long, device=t.device)

    @staticmethod
    def _unique(t, n: int, sorted_=True, return_inverse=False, return_counts=False):
        return (torch.empty(n, dtype=t.dtype, device=t.device),
                torch.empty(t.shape if return_inverse else (0,), dtype=torch.long, device=t.device),
                torch.empty(n if return_counts else 0, dtype=torch.long, device=t.device))


class RecordingPlanner(Planner):
    """Runs the data-dependent ops for real (real tensors) and records their answers for a ReplayPlanner."""

    def __init__(self):
        super().__init__(boxes=1, anchors_per_box=1)
        self.answers: list = []

    def answer(self, func, args, kwargs):
        if func is aten.index.Tensor:
            self.answers += [int(i.sum()) for i in args[1] if _is_mask(i)]
            return NotImplemented
        if func in (aten._local_scalar_dense.default, aten.nonzero.default, aten._unique2.default) or _is_nms(func):
            out = func(*args, **kwargs)
            self.answers.append(out if func is aten._local_scalar_dense.default else
                                (out[0] if isinstance(out, tuple) else out).shape[0])
            return out
        return NotImplemented


class ReplayPlanner(Planner):
    """Gives the fake run the answers a real run recorded, in the same order."""

    def __init__(self, answers: list):
        super().__init__(boxes=1, anchors_per_box=1)
        self.answers = list(answers)

    def _scalar(self, t):
        return self.answers.pop(0)

    def _count(self, shape) -> int:
        return self.answers.pop(0)

    def _unique_count(self, t) -> int:
        return self.answers.pop(0)

    def _kept(self, n: int) -> int:
        return self.answers.pop(0)


_ASKS = {aten._local_scalar_dense.default, aten.nonzero.default, aten._unique2.default, aten.index.Tensor}


def _asks(func) -> bool:
    """Whether an op may need the planner: the data-dependent ops and NMS."""
    return func in _ASKS or _is_nms(func)


def _is_mask(i) -> bool:
    return isinstance(i, torch.Tensor) and i.dtype == torch.bool


def _is_nms(func) -> bool:
    schema = getattr(func, "_schema", None)
    return schema is not None and schema.name == "torchvision::nms"


# CUDA autocast's op lists (aten/src/ATen/autocast_mode.cpp), by the Python names they are called under.
LOWER = {"conv1d", "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d", "conv_transpose3d", "convolution",
         "matmul", "__matmul__", "__rmatmul__", "mm", "bmm", "addmm", "baddbmm", "addbmm", "linear", "einsum",
         "prelu", "scaled_dot_product_attention", "mv", "addmv", "addr", "chain_matmul"}
FP32 = {"pow", "__pow__", "__rpow__", "exp", "expm1", "log", "log2", "log10", "log1p", "reciprocal", "rsqrt", "acos",
        "asin", "cosh", "sinh", "tan", "erfinv", "softplus", "layer_norm", "group_norm", "norm", "cdist", "pdist",
        "binary_cross_entropy_with_logits", "l1_loss", "smooth_l1_loss", "huber_loss", "mse_loss", "kl_div",
        "nll_loss", "cosine_similarity", "logsumexp", "dist", "renorm"}
FP32_OUT = {"softmax", "log_softmax", "sum", "prod", "cumsum", "cumprod"}  # computed into fp32, no input copy
PROMOTE = {"cat", "stack", "addcdiv", "addcmul", "atan2", "cross", "dot", "index_put", "scatter_add", "tensordot",
           "vdot", "grid_sampler", "bilinear", "index_copy"}


class CudaAutocast(torch.overrides.TorchFunctionMode):
    """CUDA autocast's casts applied to CPU tensors, above autograd as the real one is.

    Lower-precision ops run on `dtype` copies of their float32 inputs; the weights'
    copies are cached for the region as CUDA autocast caches casts of leaf tensors
    that require grad. The fp32 ops get float32 copies of half inputs; reductions and
    softmax compute into float32 without copying. `enabled=False` does nothing.
    """

    def __init__(self, dtype=torch.float16, enabled: bool = True):
        super().__init__()
        self.dtype, self.enabled = dtype, enabled
        self._cache: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def __exit__(self, *exc):
        self._cache.clear()
        return super().__exit__(*exc)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if self.enabled:
            if name in LOWER:
                args, kwargs = tree_map(self._lower, (args, kwargs))
            elif name in FP32:
                args, kwargs = tree_map(_to_fp32, (args, kwargs))
            elif name in FP32_OUT and "dtype" not in kwargs and _is_low(args[0] if args else None):
                kwargs = {**kwargs, "dtype": torch.float32}
            elif name in PROMOTE:
                args, kwargs = _promote(args, kwargs)
        return func(*args, **kwargs)

    def _lower(self, x):
        if not isinstance(x, torch.Tensor) or x.dtype != torch.float32:
            return x
        if x.is_leaf and x.requires_grad and torch.is_grad_enabled():
            hit = self._cache.get(id(x))
            if hit is None or hit[0] is not x:
                hit = self._cache[id(x)] = (x, x.to(self.dtype))
            return hit[1]
        return x.to(self.dtype)


def _is_low(x) -> bool:
    return isinstance(x, torch.Tensor) and x.dtype in (torch.float16, torch.bfloat16)


def _to_fp32(x):
    return x.float() if _is_low(x) else x


def _promote(args, kwargs):
    flat = [x for x in tree_flatten((args, kwargs))[0] if isinstance(x, torch.Tensor) and x.is_floating_point()]
    if not any(x.dtype == torch.float32 for x in flat) or not any(_is_low(x) for x in flat):
        return args, kwargs
    return tree_map(_to_fp32, (args, kwargs))
