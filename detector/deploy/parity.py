"""Pure comparisons of two models' outputs: raw differences and detection matching (numpy only).

The export parity check feeds both models the same preprocessed tensors; this
module decides whether what came out is the same. A box is matched when the other
model has a box of the same class with IoU at least `iou_match`: first among its
final (post-NMS) detections, then among its candidates before NMS, so a near-tie
that NMS resolved the other way, or a score a hair under the threshold, is
reported rather than failed.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

from detector.errors import ExportError


def raw_differences(a: np.ndarray, b: np.ndarray) -> dict:
    """Largest absolute differences of two raw (N, 4+nc, anchors) outputs: overall, box rows, score rows."""
    if a.shape != b.shape:
        raise ExportError(f"the exported model does not compute the .pt's output: raw output shapes differ: "
                          f"{a.shape} vs {b.shape}")
    d = np.abs(a.astype(np.float64) - b.astype(np.float64))
    return {"max_abs_diff": float(d.max()), "max_abs_diff_boxes_px": float(d[:, :4].max()),
            "max_abs_diff_scores": float(d[:, 4:].max())}


def iou(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """IoU of one xyxy box with each row of an (n, 4) xyxy array."""
    if len(boxes) == 0:
        return np.zeros(0)
    x1 = np.maximum(box[0], boxes[:, 0])
    y1 = np.maximum(box[1], boxes[:, 1])
    x2 = np.minimum(box[2], boxes[:, 2])
    y2 = np.minimum(box[3], boxes[:, 3])
    inter = np.clip(x2 - x1, 0, None) * np.clip(y2 - y1, 0, None)
    area = (box[2] - box[0]) * (box[3] - box[1])
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    return inter / np.maximum(area + areas - inter, 1e-9)


def candidates(raw: np.ndarray, conf: float) -> np.ndarray:
    """One image's pre-NMS boxes as (n, 6) x1 y1 x2 y2 score cls: best class per anchor, score >= conf."""
    boxes, scores = raw[:4].T, raw[4:].T  # raw is (4+nc, anchors) with boxes as centre xywh in pixels
    cls = scores.argmax(1)
    best = scores.max(1)
    keep = best >= conf
    xy, wh = boxes[keep, :2], boxes[keep, 2:]
    return np.concatenate([xy - wh / 2, xy + wh / 2, best[keep, None], cls[keep, None]], axis=1)


def clip(boxes: np.ndarray, frame: tuple[int, int] | None) -> np.ndarray:
    """Boxes (n, >=4, xyxy first) clipped to a (width, height) frame, as predict clips them to the image."""
    if frame is None or not len(boxes):
        return boxes
    out = boxes.copy()
    out[:, [0, 2]] = out[:, [0, 2]].clip(0, frame[0])
    out[:, [1, 3]] = out[:, [1, 3]].clip(0, frame[1])
    return out


def _has_match(det: np.ndarray, pool: np.ndarray, iou_match: float) -> bool:
    same = pool[pool[:, 5] == det[5]] if len(pool) else pool
    return bool(len(same)) and float(iou(det[:4], same[:, :4]).max()) >= iou_match


@dataclass
class Matching:
    """How the detections of model A and model B compare, summed over images."""

    boxes_a: int = 0  # final boxes at or above conf
    boxes_b: int = 0
    boxes_compared: int = 0  # boxes_a + boxes_b: each box is looked for in the other model's output
    matched_final: int = 0  # found among the other model's final detections
    matched_candidates: int = 0  # found only among its pre-NMS candidates (an NMS near-tie or threshold edge)
    unmatched: list = field(default_factory=list)  # up to 10 descriptions of boxes with no counterpart

    @property
    def passed(self) -> bool:
        return self.matched_final + self.matched_candidates == self.boxes_compared

    def summary(self) -> dict:
        return {**asdict(self), "passed": self.passed}


def match_detections(final_a: np.ndarray, final_b: np.ndarray, raw_a: np.ndarray, raw_b: np.ndarray,
                     conf: float, iou_match: float = 0.9, image: str = "", into: Matching | None = None,
                     labels: tuple = ("a", "b"), frame: tuple[int, int] | None = None) -> Matching:
    """Look for every final box of each model (score >= conf) in the other model's output, for one image.

    final_*: (n, 6) x1 y1 x2 y2 score cls after NMS; raw_*: that image's (4+nc, anchors)
    raw output. Candidates are taken down to conf/2 so a score just under conf still counts.
    Boxes are compared inside `frame` (width, height): what lies outside the input is never shown.
    """
    m = into or Matching()
    for tag, final, other_final, other_raw in (("a", final_a, final_b, raw_b), ("b", final_b, final_a, raw_a)):
        final, other_final = clip(final[final[:, 4] >= conf], frame), clip(other_final, frame)
        setattr(m, f"boxes_{tag}", getattr(m, f"boxes_{tag}") + len(final))
        pool = None
        for det in final:
            m.boxes_compared += 1
            if _has_match(det, other_final, iou_match):
                m.matched_final += 1
                continue
            pool = clip(candidates(other_raw, conf / 2), frame) if pool is None else pool
            if _has_match(det, pool, iou_match):
                m.matched_candidates += 1
            elif len(m.unmatched) < 10:
                m.unmatched.append(f"{image}: {labels[0] if tag == 'a' else labels[1]} box class {int(det[5])} "
                                   f"score {det[4]:.4f} at {np.round(det[:4], 1).tolist()} has no counterpart")
    return m
