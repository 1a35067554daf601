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

NEVER, ALWAYS, ABOVE_HALF = "never", "always", "above_half"

# Ultralytics' trainer and the allocator cache, by version (8.0.x to 8.4):
# - early 8.0 releases never empty the cache, so epoch 2's GPU_mem holds what validation reserved
#   (calibration rows on 8.0.9/8.0.20: +5% to +25% from epoch 1 to 2);
# - later 8.0 to 8.3 end every epoch with `torch.cuda.empty_cache()` ("clears GPU vRAM at end of epoch",
#   BaseTrainer._do_train; later `self._clear_memory()`), after validation: the next epoch rebuilds its
#   training blocks on an emptied cache (the RTX 2060 row on 8.0.196 falls from 4.62 to 0.78 GB);
# - from 8.3.7x `_clear_memory(threshold=0.5)` empties it only when reserved is above half the GPU,
#   before validation and at the epoch's end (8.4: "clear if memory utilization > 50%").
# The calibration logs bracket the releases: no clearing on 8.0.20, clearing on 8.0.86; unconditional on
# 8.3.69, conditional on 8.3.89. The boundaries below take the first release after the bracket's start.
EMPTY_CACHE_FROM = (8, 0, 21)
HALF_RULE_FROM = (8, 3, 70)
GIB_UNIT_FROM = (8, 3, 76)  # GPU_mem: memory_reserved / 1E9 up to 8.3.75, / 2**30 since (PRs 19254, 19256)


def version_tuple(version: str) -> tuple[int, ...]:
    """'8.3.40' -> (8, 3, 40); '' or unparsable -> a version above every rule (the installed 8.4)."""
    try:
        return tuple(int(x) for x in version.split(".")[:3])
    except ValueError:
        return (99,)


def cache_rule(version: str) -> str:
    """When the trainer empties the CUDA cache: NEVER, ALWAYS (each epoch's end) or ABOVE_HALF."""
    v = version_tuple(version)
    if v < EMPTY_CACHE_FROM:
        return NEVER
    return ALWAYS if v < HALF_RULE_FROM else ABOVE_HALF


def empty_cache_if(alloc, rule: str, total_bytes: float | None, before_validation: bool) -> None:
    """Apply the trainer's rule to an allocator model: before validation (ABOVE_HALF only) or at the epoch's end."""
    if rule == ALWAYS and not before_validation:
        alloc.empty_cache()
    elif rule == ABOVE_HALF and total_bytes and alloc.reserved > 0.5 * total_bytes:
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
