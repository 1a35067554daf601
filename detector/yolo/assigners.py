"""The label assigner of older Ultralytics releases, replayed as the tensors it made.

The memory model traces the installed Ultralytics' loss. Its TaskAlignedAssigner
works on boolean masks and the positive pairs only; older releases built tensors of
(batch, boxes, anchors) elements and more, in float32 and int64, and on images with
many boxes those are the largest tensors of a training step. Read from the wheels
on PyPI (ultralytics/yolo/utils/tal.py up to 8.0.x, ultralytics/utils/tal.py since):

- up to 8.0.51, the CIoU of every box with every anchor (bbox_iou on broadcast shapes);
  from 8.0.52, only for the anchors inside a box;
- up to 8.0.95, the top-k anchors of each box as a one-hot int64 tensor
  (batch, boxes, topk, anchors) summed over topk, and the best box of each anchor as a
  one-hot (batch, anchors, boxes); from 8.0.96, scatter_add into int8;
- from 8.0.52 to 8.0.106, the predicted and true boxes repeated to
  (batch, boxes, anchors, 4) before masking (a view from 8.0.107);
- up to 8.4.90, the anchor-inside-box test as concatenated float deltas
  (batch x boxes, anchors, 4), the class scores of every pair gathered, float masks, and
  int64 one-hot targets (batch, anchors, classes). The boundaries are the first release
  after the last one seen with the old code.

`replaying(version)` makes the installed assigner run, before its own work, the
older release's tensors in the same order, shapes and dtypes (values do not matter:
the trace counts storages), and frees them, so the step's peak is the larger of the
two programs' and the caching allocator keeps the older one's blocks.
"""

from __future__ import annotations

import contextlib

import torch

from detector.yolo.memcauses import version_tuple

FULL_CIOU_UNTIL = (8, 0, 51)
ONE_HOT_UNTIL = (8, 0, 95)
REPEAT_UNTIL = (8, 0, 106)  # from FULL_CIOU_UNTIL on
FLOAT_MASKS_UNTIL = (8, 4, 90)


def era(version: str) -> str:
    """'8.0-full-ciou', '8.0-one-hot', '8.0-repeat', 'float-masks' or 'current' ('' = the installed one)."""
    v = version_tuple(version or "")
    if v <= FULL_CIOU_UNTIL:
        return "8.0-full-ciou"
    if v <= ONE_HOT_UNTIL:
        return "8.0-one-hot"
    if v <= REPEAT_UNTIL:
        return "8.0-repeat"
    return "float-masks" if v <= FLOAT_MASKS_UNTIL else "current"


@contextlib.contextmanager
def replaying(version: str):
    """Within: the installed TaskAlignedAssigner also makes (and frees) the tensors of `version`'s assigner."""
    name = era(version)
    if name == "current":
        yield name
        return
    from ultralytics.utils.tal import TaskAlignedAssigner

    original = TaskAlignedAssigner._forward

    def _forward(self, pd_scores, pd_bboxes, anc_points, gt_labels, gt_bboxes, mask_gt, **extra):
        older(name, self.bs, self.n_max_boxes, pd_scores, pd_bboxes, self.topk)
        return original(self, pd_scores, pd_bboxes, anc_points, gt_labels, gt_bboxes, mask_gt, **extra)

    TaskAlignedAssigner._forward = _forward
    try:
        yield name
    finally:
        TaskAlignedAssigner._forward = original


def older(name: str, bs: int, n: int, pd_scores, pd_bboxes, topk: int) -> None:
    """The older assigner's tensors, alive as long as they were there; everything is freed on return."""
    na, nc = pd_scores.shape[1], pd_scores.shape[2]
    f32, sdt, dev = pd_bboxes.dtype, pd_scores.dtype, pd_scores.device
    pairs = (bs, n, na)

    def empty(shape, dtype=f32):
        return torch.empty(shape, dtype=dtype, device=dev)

    # Anchor centres inside each box: left-top and right-bottom deltas, concatenated, reduced.
    halves = [empty((bs * n, na, 2)), empty((bs * n, na, 2))]
    in_gts = torch.cat(halves, 2).amin(2).view(pairs)
    del halves
    mask = in_gts * empty((bs, n, 1))
    # Alignment metric: scores of every pair gathered, overlaps, and their powers.
    scores = empty(pairs, sdt).clone()
    if name == "8.0-full-ciou":
        overlaps = _full_ciou(bs, n, na, f32, dev)
    else:
        overlaps = empty(pairs)
        if name in ("8.0-one-hot", "8.0-repeat"):
            repeated = [empty((bs, n, na, 4)), empty((bs, n, na, 4))]
            del repeated
    metric = scores.pow(0.5) * overlaps.pow(6.0)
    del scores
    one_hot = name in ("8.0-full-ciou", "8.0-one-hot")
    # Top-k candidates per box.
    if one_hot:  # F.one_hot(idx, anchors): an int64 zeros tensor with ones scattered (without its range check,
        # a data-dependent read that a fake run answers differently from a real one)
        idx = torch.zeros((bs, n, topk, 1), dtype=torch.long, device=dev)
        counts = torch.zeros((bs, n, topk, na), dtype=torch.long, device=dev).scatter_(-1, idx, 1).sum(-2)
        counts = torch.where(counts > 1, 0, counts)
    else:
        counts = empty(pairs, torch.int8)
        counts.masked_fill_(counts > 1, 0)
    mask_pos = counts.to(f32) * in_gts * mask
    del counts, in_gts, mask
    # One box per anchor: the best overlap where an anchor fell in several.
    if one_hot:
        idx = torch.zeros((bs, na, 1), dtype=torch.long, device=dev)
        best = torch.zeros((bs, na, n), dtype=torch.long, device=dev).scatter_(-1, idx, 1)
        best = best.permute(0, 2, 1).to(f32)
    else:
        best = empty(pairs)
    mask_pos = torch.where(empty(pairs, torch.bool), best, mask_pos)
    del best
    # Targets: one-hot classes of every anchor, masked by the foreground.
    targets = torch.zeros((bs, na, nc), dtype=torch.int64, device=dev)
    targets = torch.where(empty((bs, na, nc), torch.bool), targets, 0)
    norm = (metric * mask_pos / 2).amax(-2).unsqueeze(-1) + (overlaps * mask_pos).amax(-1).sum()
    targets = targets * norm
    del targets, norm, metric, overlaps, mask_pos


def _full_ciou(bs: int, n: int, na: int, dtype, dev):
    """CIoU of every box with every anchor (up to 8.0.51): bbox_iou on (b, n, 1, 4) against (b, 1, anchors, 4)."""
    from ultralytics.utils.metrics import bbox_iou

    gt = torch.empty((bs, n, 1, 4), dtype=dtype, device=dev)
    pd = torch.empty((bs, 1, na, 4), dtype=dtype, device=dev)
    return bbox_iou(gt, pd, xywh=False, CIoU=True).squeeze(-1).clamp(0)
