"""The built-in dataset: deterministic images of filled shapes with YOLO labels.

Every image is a function of (seed, split, index) alone, so the same settings give
byte-identical files on every machine, and the dataset can be rebuilt instead of
committed. Objects vary in class, size, position, rotation and colour; backgrounds
are gradients with noise and clutter lines, so the task is not solvable by colour.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import cv2
import numpy as np

from detector import fileio
from detector.errors import DatasetError, DiskFull

CLASSES = ("circle", "square", "triangle", "cross")
GENERATOR_VERSION = 1  # bump when the drawing code changes, so caches are rebuilt


@dataclass(frozen=True)
class SynthSpec:
    """What to generate: sizes and the seed that fixes every pixel."""

    train_images: int = 400
    val_images: int = 100
    imgsz: int = 128
    seed: int = 0
    max_objects: int = 4

    def key(self) -> str:
        """A short stable name for the cache folder of this spec."""
        blob = json.dumps({**asdict(self), "v": GENERATOR_VERSION}, sort_keys=True)
        return f"shapes-{self.imgsz}px-{self.train_images}-{self.val_images}-s{self.seed}-" + hashlib.sha1(
            blob.encode()
        ).hexdigest()[:8]


def _polygon(cls: str, cx: float, cy: float, r: float, angle: float) -> np.ndarray:
    """Vertices of a square, triangle or cross centred on (cx, cy) with circumradius r."""
    if cls == "square":
        pts = [(math.cos(angle + k * math.pi / 2 + math.pi / 4), math.sin(angle + k * math.pi / 2 + math.pi / 4)) for k in range(4)]
    elif cls == "triangle":
        pts = [(math.cos(angle + k * 2 * math.pi / 3), math.sin(angle + k * 2 * math.pi / 3)) for k in range(3)]
    else:  # cross: 12 vertices, arms a third of the width
        a = 1 / 3
        base = [(a, 1), (a, a), (1, a), (1, -a), (a, -a), (a, -1), (-a, -1), (-a, -a), (-1, -a), (-1, a), (-a, a), (-a, 1)]
        c, s = math.cos(angle), math.sin(angle)
        pts = [((x * c - y * s) / math.sqrt(2) * 1.3, (x * s + y * c) / math.sqrt(2) * 1.3) for x, y in base]
    return np.array([(cx + r * x, cy + r * y) for x, y in pts], dtype=np.float32)


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """A two-colour gradient with noise and a few thin clutter lines."""
    c0, c1 = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
    t = np.linspace(0, 1, size, dtype=np.float32)
    grad = t[None, :, None] if rng.random() < 0.5 else t[:, None, None]
    img = (c0 * (1 - grad) + c1 * grad) * np.ones((size, size, 1), np.float32)
    img += rng.normal(0, 12, img.shape)
    img = np.clip(img, 0, 255).astype(np.uint8)
    for _ in range(int(rng.integers(0, 4))):
        p0, p1 = rng.integers(0, size, 2), rng.integers(0, size, 2)
        colour = tuple(int(v) for v in rng.integers(0, 256, 3))
        cv2.line(img, tuple(int(v) for v in p0), tuple(int(v) for v in p1), colour, 1, cv2.LINE_AA)
    return img


def _contrasting_colour(rng: np.random.Generator, under: np.ndarray) -> tuple[int, int, int]:
    """A random colour at least a fixed distance from the mean colour beneath the object."""
    mean = under.reshape(-1, 3).mean(0)
    for _ in range(20):
        colour = rng.integers(0, 256, 3)
        if np.abs(colour - mean).sum() > 160:
            break
    return tuple(int(v) for v in colour)


def draw_image(spec: SynthSpec, split: str, index: int) -> tuple[np.ndarray, list[tuple[int, float, float, float, float]]]:
    """Draw one image and return it with its YOLO labels (class, cx, cy, w, h normalized)."""
    split_salt = {"train": 0, "val": 1}[split]
    rng = np.random.default_rng([spec.seed, split_salt, index])
    size = spec.imgsz
    img = _background(rng, size)
    labels: list[tuple[int, float, float, float, float]] = []
    boxes: list[tuple[float, float, float, float]] = []
    for _ in range(int(rng.integers(1, spec.max_objects + 1))):
        for _try in range(10):  # place without heavy overlap so every label stays visible
            r = float(rng.uniform(0.07, 0.22)) * size
            cx, cy = rng.uniform(r, size - r, 2)
            box = (cx - r, cy - r, cx + r, cy + r)
            if all(_iou(box, b) < 0.1 for b in boxes):
                break
        else:
            continue
        cls_id = int(rng.integers(0, len(CLASSES)))
        cls = CLASSES[cls_id]
        x0, y0 = int(max(cx - r, 0)), int(max(cy - r, 0))
        colour = _contrasting_colour(rng, img[y0 : int(cy + r) + 1, x0 : int(cx + r) + 1])
        if cls == "circle":
            cv2.circle(img, (int(round(cx)), int(round(cy))), int(round(r)), colour, -1, cv2.LINE_AA)
            xs, ys = np.array([cx - r, cx + r]), np.array([cy - r, cy + r])
        else:
            pts = _polygon(cls, cx, cy, r, float(rng.uniform(0, 2 * math.pi)))
            cv2.fillPoly(img, [np.round(pts).astype(np.int32)], colour, cv2.LINE_AA)
            xs, ys = pts[:, 0], pts[:, 1]
        bx0, bx1 = float(np.clip(xs.min(), 0, size)), float(np.clip(xs.max(), 0, size))
        by0, by1 = float(np.clip(ys.min(), 0, size)), float(np.clip(ys.max(), 0, size))
        boxes.append(box)
        labels.append((cls_id, (bx0 + bx1) / 2 / size, (by0 + by1) / 2 / size, (bx1 - bx0) / size, (by1 - by0) / size))
    return img, labels


def _iou(a: tuple[float, ...], b: tuple[float, ...]) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def generate(spec: SynthSpec, out_dir: Path, progress=None) -> Path:
    """Write the dataset under out_dir (images/, labels/, data.yaml) and return the YAML path.

    Writes into a staging folder beside it and renames it at the end (detector.fileio), so an
    interrupted generation never leaves a half dataset that looks complete.
    """
    out_dir = Path(out_dir)
    total = spec.train_images + spec.val_images
    done = 0
    try:
        with fileio.staged_dir(out_dir, durable=False) as tmp:  # each file below is already fsynced
            for split, count in (("train", spec.train_images), ("val", spec.val_images)):
                (tmp / "images" / split).mkdir(parents=True, exist_ok=True)
                (tmp / "labels" / split).mkdir(parents=True, exist_ok=True)
                for i in range(count):
                    img, labels = draw_image(spec, split, i)
                    stem = f"{split}_{i:05d}"
                    fileio.encode_image(tmp / "images" / split / f"{stem}.png", img)
                    lines = "".join(f"{c} {x:.6f} {y:.6f} {w:.6f} {h:.6f}\n" for c, x, y, w, h in labels)
                    fileio.write_text(tmp / "labels" / split / f"{stem}.txt", lines)
                    done += 1
                    if progress:
                        progress(done, total)
            names = "\n".join(f"  {i}: {n}" for i, n in enumerate(CLASSES))
            fileio.write_text(tmp / "data.yaml",
                              f"# detector built-in dataset, generated: {json.dumps(asdict(spec))}\n"
                              f"path: {out_dir.resolve()}\ntrain: images/train\nval: images/val\nnames:\n{names}\n")
    except DiskFull:
        raise
    except OSError as e:
        raise DatasetError(f"cannot write the built-in dataset to {out_dir}: {e.strerror or e}") from e
    return out_dir / "data.yaml"


def ensure(spec: SynthSpec, cache_root: Path, progress=None) -> Path:
    """Return the data YAML of the cached dataset for spec, generating it on first use."""
    out_dir = Path(cache_root) / spec.key()
    yaml_path = out_dir / "data.yaml"
    if yaml_path.exists():
        return yaml_path
    return generate(spec, out_dir, progress)


def spec_for(train_images: int, imgsz: int, seed: int) -> SynthSpec:
    """The spec `detector datasets synth` asks for: val gets a quarter of train, as in the defaults (400/100)."""
    if train_images < 1:
        raise DatasetError(f"--images must be at least 1, not {train_images}")
    if imgsz < 32:
        raise DatasetError(f"--imgsz must be at least 32 (the model's largest stride), not {imgsz}")
    return SynthSpec(train_images=train_images, val_images=max(1, train_images // 4), imgsz=imgsz, seed=seed)


def generate_into(spec: SynthSpec, out_dir: Path) -> Path:
    """generate() into a folder the user named, refusing to replace a folder that is not a built-in dataset."""
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        data = out_dir / "data.yaml"
        if not (data.is_file() and data.read_text(encoding="utf-8").startswith("# detector built-in dataset")):
            raise DatasetError(f"{out_dir} exists and is not a built-in dataset; pass an empty or new --out")
    return generate(spec, out_dir)
