"""The geometry of Ultralytics' mosaic and random affine, and the boxes it keeps, without the canvas.

Every random number is drawn from the same generator (Python's `random`), in the
same order and with the same formula as Ultralytics' Mosaic and RandomPerspective
(ultralytics/data/augment.py, 8.4.x), so one seed gives both loaders the same
layout, the same matrix and therefore the same boxes. Only how pixels get there
differs (detector.yolo.fastload.pipeline).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import cv2
import numpy as np


@dataclass(frozen=True)
class Tile:
    """One source image's visible part: crop (x1, y1, x2, y2) of img lands at canvas (x1, y1, x2, y2)."""

    img: np.ndarray
    crop: tuple[int, int, int, int]
    at: tuple[int, int, int, int]


def mosaic_layout(shapes: list[tuple[int, int]], s: int) -> list[tuple[tuple, tuple]]:
    """(crop, canvas rect) of the four images around a random centre of the 2s x 2s canvas.

    shapes are the images' (h, w). The centre is drawn as Ultralytics draws it: y first, then x,
    uniform in [s/2, 3s/2) (integer part).
    """
    low = -(-s // 2)  # Ultralytics' border is -s // 2 (floor); the range starts at its negation
    yc, xc = (int(random.uniform(low, 2 * s - low)) for _ in range(2))
    out = []
    for i, (h, w) in enumerate(shapes):
        left, top = i in (0, 2), i in (0, 1)  # quadrants: top-left, top-right, bottom-left, bottom-right
        x1, x2 = (max(xc - w, 0), xc) if left else (xc, min(xc + w, 2 * s))
        y1, y2 = (max(yc - h, 0), yc) if top else (yc, min(yc + h, 2 * s))
        # the image's edge nearest the centre touches the centre; its far side is cut by the canvas
        cx1 = w - (x2 - x1) if left else 0
        cy1 = h - (y2 - y1) if top else 0
        out.append(((cx1, cy1, cx1 + (x2 - x1), cy1 + (y2 - y1)), (x1, y1, x2, y2)))
    return out


def draw_affine(canvas_wh: tuple[int, int], out_wh: tuple[int, int], hyp) -> tuple[np.ndarray, float]:
    """Ultralytics' random perspective/affine matrix (canvas -> output, 3x3 float32) and its scale gain.

    Centre on the canvas, then perspective, rotation and scale, shear, and a translation around the
    output's centre: eight draws in Ultralytics' order, even for ranges of zero.
    """
    centre = np.eye(3, dtype=np.float32)
    centre[0, 2], centre[1, 2] = -canvas_wh[0] / 2, -canvas_wh[1] / 2
    persp = np.eye(3, dtype=np.float32)
    persp[2, 0] = random.uniform(-hyp.perspective, hyp.perspective)
    persp[2, 1] = random.uniform(-hyp.perspective, hyp.perspective)
    angle = random.uniform(-hyp.degrees, hyp.degrees)
    lo, hi = hyp.scale if isinstance(hyp.scale, (tuple, list)) else (1 - hyp.scale, 1 + hyp.scale)
    gain = random.uniform(lo, hi)
    rot = np.eye(3, dtype=np.float32)
    rot[:2] = cv2.getRotationMatrix2D(angle=angle, center=(0, 0), scale=gain)
    shear = np.eye(3, dtype=np.float32)
    shear[0, 1] = math.tan(random.uniform(-hyp.shear, hyp.shear) * math.pi / 180)
    shear[1, 0] = math.tan(random.uniform(-hyp.shear, hyp.shear) * math.pi / 180)
    move = np.eye(3, dtype=np.float32)
    move[0, 2] = random.uniform(0.5 - hyp.translate, 0.5 + hyp.translate) * out_wh[0]
    move[1, 2] = random.uniform(0.5 - hyp.translate, 0.5 + hyp.translate) * out_wh[1]
    return move @ shear @ rot @ persp @ centre, gain


def is_axis_aligned(m: np.ndarray) -> bool:
    """True when the matrix only scales and translates (Ultralytics' defaults: no rotation, shear, perspective)."""
    return m[0, 1] == 0 and m[1, 0] == 0 and m[2, 0] == 0 and m[2, 1] == 0 and m[0, 0] > 0 and m[1, 1] > 0


def tile_boxes(label: dict, hw: tuple[int, int], offset: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """A dataset label's boxes as pixel xyxy on the canvas (the image at (h, w) shifted by offset), and classes."""
    h, w = hw
    b = label["bboxes"]  # normalized xywh, as Ultralytics' label cache holds them
    xyxy = np.empty_like(b)
    xyxy[:, 0] = (b[:, 0] - b[:, 2] / 2) * w + offset[0]
    xyxy[:, 1] = (b[:, 1] - b[:, 3] / 2) * h + offset[1]
    xyxy[:, 2] = (b[:, 0] + b[:, 2] / 2) * w + offset[0]
    xyxy[:, 3] = (b[:, 1] + b[:, 3] / 2) * h + offset[1]
    return xyxy, label["cls"]


def clip_to_canvas(boxes: np.ndarray, cls: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Mosaic's own step: clip to the 2s canvas and drop the boxes left with no area."""
    boxes = boxes.clip(0, size)
    keep = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]) > 0
    return boxes[keep], cls[keep]


def warp_boxes(boxes: np.ndarray, m: np.ndarray, gain: float, out_wh: tuple[int, int],
               perspective: bool) -> np.ndarray:
    """Boxes through the matrix (the hull of their four corners), clipped to the output, and which to keep.

    Returns (new boxes, keep mask). A box is kept as Ultralytics keeps it: over 2 px wide and high,
    over 10% of its area after scaling by the gain alone, aspect ratio under 100.
    """
    n = len(boxes)
    if n == 0:
        return boxes, np.zeros(0, bool)
    corners = np.ones((n * 4, 3), dtype=boxes.dtype)
    corners[:, :2] = boxes[:, [0, 1, 2, 3, 0, 3, 2, 1]].reshape(n * 4, 2)
    corners = corners @ m.T
    xy = (corners[:, :2] / corners[:, 2:3] if perspective else corners[:, :2]).reshape(n, 8)
    x, y = xy[:, [0, 2, 4, 6]], xy[:, [1, 3, 5, 7]]
    new = np.stack((x.min(1), y.min(1), x.max(1), y.max(1)), 1).astype(boxes.dtype)
    new[:, [0, 2]] = new[:, [0, 2]].clip(0, out_wh[0])
    new[:, [1, 3]] = new[:, [1, 3]].clip(0, out_wh[1])
    w1, h1 = (boxes[:, 2] - boxes[:, 0]) * gain, (boxes[:, 3] - boxes[:, 1]) * gain
    w2, h2 = new[:, 2] - new[:, 0], new[:, 3] - new[:, 1]
    eps = 1e-16
    aspect = np.maximum(w2 / (h2 + eps), h2 / (w2 + eps))
    keep = (w2 > 2) & (h2 > 2) & (w2 * h2 / (w1 * h1 + eps) > 0.1) & (aspect < 100)
    return new, keep


def resize_rect(m: np.ndarray, tile: Tile, out_wh: tuple[int, int]):
    """Where an axis-aligned matrix puts a tile: (source crop of tile.img, destination rect), or None.

    The destination is every output pixel whose centre maps into the tile's canvas rect, so
    neighbouring tiles share no pixel and leave no gap. The source crop is chosen so that
    cv2.resize's half-pixel mapping follows the matrix to within half a source pixel.
    """
    src, dst = [], []
    for axis in (0, 1):  # x, then y
        gain, shift = float(m[axis, axis]), float(m[axis, 2])
        a, b = tile.at[axis], tile.at[axis + 2]
        d0 = min(max(math.ceil(gain * a + shift), 0), out_wh[axis])
        d1 = min(max(math.ceil(gain * b + shift), 0), out_wh[axis])
        if d1 <= d0:
            return None
        # source coordinate of destination pixel d0, in the image: canvas position, less the rect, plus the crop
        u0 = (d0 - shift) / gain - a + tile.crop[axis] + 0.5 - 0.5 / gain
        limit = tile.img.shape[1 - axis]
        s0 = min(max(round(u0), 0), limit - 1)
        s1 = min(max(round(u0 + (d1 - d0) / gain), s0 + 1), limit)
        src.append((s0, s1))
        dst.append((d0, d1))
    return src, dst
