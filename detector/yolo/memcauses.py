"""What the traced steps leave out of GPU_mem, one named cause each, with where it comes from.

The memory model (detector.yolo.memory) traces Ultralytics' steps; these are the
rules around them that decide what `torch.cuda.memory_reserved()` shows at the
end of an epoch, and what the worst epoch can add:

- when the trainer empties the cache (cache_rule): validation's blocks stay
  reserved into the next epoch unless the trainer calls empty_cache;
- the unit GPU_mem is printed in (gpu_mem_unit);
- cuDNN's convolution workspaces, by GPU generation (workspace_share), and in the worst case
  (cudnn_workspace_high, WORST_EXTRA_SHARE).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# Ultralytics' trainer and the allocator cache, by version (read in the trainer.py of every wheel on PyPI
# around each boundary). The cache is emptied (`torch.cuda.empty_cache()`, later `_clear_memory()`) at
# an epoch's end, after validation, and from 8.3.152 also just before validation; from 8.3.87 only when
# reserved memory is above a share of the GPU (`_get_memory(fraction=True)`: memory_reserved / total):
# - up to 8.0.20: never, so epoch 2's GPU_mem holds what validation reserved (calibration rows on 8.0.9
#   and 8.0.20: +5% to +25% from epoch 1 to 2). 8.0.35 empties; 8.0.21-8.0.34 are no longer on PyPI,
#   so the boundary takes the first release after 8.0.20;
# - 8.0.21 to 8.3.86: at every epoch's end ("clears GPU vRAM at end of epoch"): the next epoch rebuilds
#   its training blocks on an emptied cache (the RTX 2060 row on 8.0.196 falls from 4.62 to 0.78 GB);
# - 8.3.87 to 8.3.108: at the epoch's end above 90% of the GPU;
# - 8.3.109 to 8.3.151: at the epoch's end above 50%;
# - 8.3.152 on (the installed 8.4 too): before validation and at the epoch's end, above 50%.


@dataclass(frozen=True)
class CacheRule:
    """When the trainer empties the cache: a share of the GPU reserved memory must pass (0: always; None: never)."""

    at_epoch_end: float | None
    before_validation: float | None = None


NEVER = CacheRule(None)
ALWAYS = CacheRule(0.0)
_RULES = [((8, 0, 21), ALWAYS), ((8, 3, 87), CacheRule(0.9)), ((8, 3, 109), CacheRule(0.5)),
          ((8, 3, 152), CacheRule(0.5, 0.5))]
GIB_UNIT_FROM = (8, 3, 76)  # GPU_mem: memory_reserved / 1E9 up to 8.3.75, / 2**30 since (PRs 19254, 19256)


def version_tuple(version: str) -> tuple[int, ...]:
    """'8.3.40' -> (8, 3, 40); '' or unparsable -> a version above every rule (the installed 8.4)."""
    try:
        return tuple(int(x) for x in version.split(".")[:3])
    except ValueError:
        return (99,)


def cache_rule(version: str) -> CacheRule:
    """When the trainer of this release empties the CUDA cache."""
    v, rule = version_tuple(version), NEVER
    for start, r in _RULES:
        if v >= start:
            rule = r
    return rule


def empty_cache_if(alloc, rule: CacheRule, total_bytes: float | None, before_validation: bool) -> None:
    """Apply the trainer's rule to an allocator model, before validation or at the epoch's end.

    A share-of-the-GPU rule needs the GPU's size; without it (a plan for GPUs of several sizes) the
    cache counts as kept, the larger reservation.
    """
    share = rule.before_validation if before_validation else rule.at_epoch_end
    if share == 0.0 or (share is not None and total_bytes and alloc.reserved > share * total_bytes):
        alloc.empty_cache()


def gpu_mem_unit(version: str) -> float:
    """Bytes per unit of Ultralytics' GPU_mem column: GB (1e9) up to 8.3.75, GiB from 8.3.76."""
    return 2.0**30 if version_tuple(version) >= GIB_UNIT_FROM else 1e9


def cudnn_workspace_high(base, events: list) -> int:
    """The worst cuDNN workspace: one block as large as the largest activation of the forward pass.

    Without benchmark mode PyTorch asks cuDNN's heuristics for an algorithm and allocates the
    workspace it wants from the caching allocator for the duration of the call (aten/src/ATen/native/
    cudnn/Conv_v8.cpp). The algorithms ranked first for large feature maps on some GPUs (FFT, winograd
    non-fused, implicit GEMM with precomputed indices) want a workspace of the order of the layer's
    input; a CPU cannot see which one a given GPU picks, so the upper bound holds one such block.
    """
    end = base.val_start if base.val_start is not None else len(events)
    return max((n for n, _, phase in events[:end] if n > 0 and phase == "forward"), default=0)


# cuDNN convolution workspaces, typical: without benchmark mode PyTorch takes cuDNN's heuristic algorithm for
# each convolution and borrows its workspace from the caching allocator; the cache keeps those blocks (and the
# gaps they leave between activations) for the rest of the run. A CPU trace takes none. Their size follows the
# layers' tensors, and the algorithms the heuristics rank first differ by GPU generation: on Pascal, Volta and
# Turing (no sm80 kernels) they ask for more. Share of the training peak's activations and loss tensors, two
# numbers estimated from the calibration set (tests/data/gpu_memory_calibration.csv): the typical gap between
# the traced and the published figure on rows with few boxes, per generation (docs/benchmarks.md, "GPU memory:
# calibration", holds the table and a split-half check). An unknown GPU gets the larger share: reading low
# means an out-of-memory error on the user's first run.
WORKSPACE_SHARE = {"pre-ampere": 0.12, "ampere+": 0.06}
# The worst epoch on top: a workspace-hungry algorithm picked for a large layer, and the allocator's
# fragmentation over an epoch of changing loss shapes (both unseen by a two-iteration trace); the largest
# excess over the typical figure on the calibration rows with few boxes.
WORST_EXTRA_SHARE = 0.25
_PRE_AMPERE = re.compile(r"\b(p100|p40|p4|p6|k80|m60|m40|v100|t4|titan (x|v|rtx)|quadro (p|gv|rtx)|rtx 20\d0|"
                         r"gtx (9|10|16)\d0|gtx titan)", re.I)
_AMPERE_PLUS = re.compile(r"\b(a100|a800|a30|a40|a10g?|a16|a2|l4|l40s?|h100|h200|h800|b100|b200|gh200|"
                          r"rtx (30|40|50)\d0|rtx a\d{4}|rtx \d{4} ada|rtx pro)", re.I)


def gpu_generation(name: str | None) -> str | None:
    """'pre-ampere', 'ampere+' or None (unknown) from a CUDA device name such as 'Tesla T4'."""
    text = f" {name or ''} ".replace("NVIDIA", " ").replace("GeForce", " ")
    if _PRE_AMPERE.search(text):
        return "pre-ampere"
    if _AMPERE_PLUS.search(text):
        return "ampere+"
    return None


def workspace_share(name: str | None) -> float:
    """The typical cuDNN workspace as a share of the training peak's activations, for this GPU (unknown: the larger)."""
    return WORKSPACE_SHARE.get(gpu_generation(name), max(WORKSPACE_SHARE.values()))
