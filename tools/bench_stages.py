"""Per-stage CPU cost of the training loader, per output image: where Ultralytics' loader spends its time, and ours.

Stages are timed by wrapping each step of the pipeline (process CPU time, one process,
no workers) while the loader draws --images samples; collate is timed on batches of --batch.

  .venv/bin/python tools/bench_stages.py --imgsz 640 --loader ultralytics
  .venv/bin/python tools/bench_stages.py --imgsz 640 --loader fast

Prints a Markdown table: stage, ms per output image, share of the total.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COCO128 = ROOT.parent / "shared" / "data" / "coco128" / "coco128.yaml"

SPENT: dict[str, float] = defaultdict(float)


def timed(name: str, fn, exclude: tuple[str, ...] = ()):
    """fn, adding its CPU time to SPENT[name], less what the stages in exclude spent inside it."""
    def wrapper(*a, **k):
        inner = sum(SPENT[x] for x in exclude)
        t = time.process_time()
        try:
            return fn(*a, **k)
        finally:
            SPENT[name] += time.process_time() - t - (sum(SPENT[x] for x in exclude) - inner)
    return wrapper


def _patch_decode(dataset) -> None:
    """Split image loading into the JPEG decode (cv2.imdecode) and the rest of load_image (resize, buffer)."""
    import cv2

    cv2.imdecode = timed("decode (JPEG)", cv2.imdecode)
    dataset.load_image = timed("resize to imgsz", dataset.load_image, exclude=("decode (JPEG)",))


def instrument_stock(dataset) -> None:
    """Wrap each step of Ultralytics' v8 pipeline: Mosaic (less its image loads), affine, ..., Format."""
    from ultralytics.data.augment import Compose

    loads = ("decode (JPEG)", "resize to imgsz")
    names = {"Mosaic": "mosaic fill (2s x 2s canvas)", "RandomPerspective": "affine warp into s x s",
             "CopyPaste": "copy-paste (p=0)", "MixUp": "mixup (p=0)", "CutMix": "cutmix (p=0)",
             "Albumentations": "albumentations", "RandomHSV": "HSV", "RandomFlip": "flips", "Format": "format"}

    def wrap(compose):
        for i, t in enumerate(compose.transforms):
            if isinstance(t, Compose):
                wrap(t)
            else:
                compose.transforms[i] = timed(names.get(type(t).__name__, type(t).__name__), t, exclude=loads)

    wrap(dataset.transforms)


def instrument_fast(dataset) -> None:
    """Wrap each step of detector's fast pipeline (detector.yolo.fastload)."""
    pipe = dataset.transforms
    loads = ("decode (JPEG)", "resize to imgsz")
    pipe.place = timed("mosaic + affine (tiles resized into the output)", pipe.place, exclude=loads)
    pipe.albumentations = timed("albumentations", pipe.albumentations)
    pipe.hsv = timed("HSV", pipe.hsv)
    pipe.flip = timed("flips", pipe.flip)
    pipe.format = timed("format", pipe.format)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, default=COCO128, help="YOLO data YAML (default: ../shared coco128)")
    p.add_argument("--imgsz", type=int, default=640)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--images", type=int, default=384)
    p.add_argument("--loader", default="ultralytics", choices=["ultralytics", "fast"])
    p.add_argument("--mosaic", type=float, default=1.0)
    args = p.parse_args(argv)

    from bench_loader import repeated_dataset

    from detector.data import datasets
    from detector.yolo import loader as yolo_loader

    # read through symlinks, so the label cache is written there, not beside the dataset; removed at exit
    tmp = tempfile.TemporaryDirectory(prefix="bench-stages-")
    data_yaml = repeated_dataset(args.data, datasets.load(args.data).train_images, Path(tmp.name) / "mirror")
    dataset, _, _ = yolo_loader.training_loader(data_yaml, None, args.imgsz, args.batch, workers=0,
                                                overrides={"mosaic": args.mosaic}, loader=args.loader)
    (instrument_stock if args.loader == "ultralytics" else instrument_fast)(dataset)
    for i in range(32):  # warm-up: label cache, the mosaic buffer, first-call costs
        dataset[i % len(dataset)]
    SPENT.clear()
    _patch_decode(dataset)
    import random

    order = [random.randrange(len(dataset)) for _ in range(args.images)]
    t0 = time.process_time()
    samples = []
    for i in order:
        samples.append(dataset[i])
        if len(samples) == args.batch:
            timed("collate", dataset.collate_fn)(samples)
            samples = []
    total = 1000 * (time.process_time() - t0) / args.images
    print(f"loader {args.loader}, imgsz {args.imgsz}, mosaic {args.mosaic}, {args.images} images of {args.data}\n")
    print("| stage | CPU ms/image | share |")
    print("|---|---:|---:|")
    for name, s in sorted(SPENT.items(), key=lambda kv: -kv[1]):
        print(f"| {name} | {1000 * s / args.images:.2f} | {100 * 1000 * s / args.images / total:.0f}% |")
    rest = total - 1000 * sum(SPENT.values()) / args.images
    print(f"| rest (labels, Python glue) | {rest:.2f} | {100 * rest / total:.0f}% |")
    print(f"| **total** | **{total:.2f}** | |")


if __name__ == "__main__":
    main()
