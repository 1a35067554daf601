"""Per-stage CPU cost of the training loader, per output image: where Ultralytics' loader spends its time, and ours.

Stages are timed by wrapping each step of the pipeline (process CPU time, one process,
no workers) while the loader draws --images samples; collate and the copy into pinned memory are timed
on batches of --batch.

  .venv/bin/python tools/bench_stages.py --imgsz 640            # both loaders, alternating rounds
  .venv/bin/python tools/bench_stages.py --imgsz 640 --loader fast

Prints a Markdown table: stage, CPU ms per output image for each loader. Both loaders run in one process in
alternating rounds over the same sample order, so a busy spell on a shared machine hits them alike.
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


def _patch_decode(datasets: list) -> None:
    """Split image loading into the JPEG decode (cv2.imdecode) and the rest of load_image (resize, buffer)."""
    import cv2

    cv2.imdecode = timed("decode (JPEG)", cv2.imdecode)
    for dataset in datasets:
        dataset.load_image = timed("resize to imgsz", dataset.load_image, exclude=("decode (JPEG)",))


def pin(batch: dict) -> None:
    """The copy into pinned memory that the DataLoader's pin thread makes on a GPU machine.

    Without CUDA nothing can be pinned: the copy into a preallocated pageable tensor stands in for it.
    """
    import torch

    img = batch["img"]
    if torch.cuda.is_available():
        img.pin_memory()
    else:
        torch.empty_like(img).copy_(img)


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


def build(data_yaml: Path, loader: str, args):
    """The training dataset of one loader, instrumented and warmed up (label cache, mosaic buffer, first calls)."""
    from detector.yolo import loader as yolo_loader

    dataset, _, _ = yolo_loader.training_loader(data_yaml, None, args.imgsz, args.batch, workers=0,
                                                overrides={"mosaic": args.mosaic}, loader=loader)
    (instrument_stock if loader == "ultralytics" else instrument_fast)(dataset)
    for i in range(32):
        dataset[i % len(dataset)]
    return dataset


def run_chunk(dataset, order: list[int], batch: int) -> float:
    """CPU seconds to fetch (as torch's DataLoader fetches: __getitems__ where the dataset has it), collate, pin."""
    fetch = getattr(dataset, "__getitems__", None) or (lambda idx: [dataset[i] for i in idx])
    t0 = time.process_time()
    for k in range(0, len(order), batch):
        b = timed("collate", dataset.collate_fn)(fetch(order[k:k + batch]))
        timed("pinned-memory copy (pageable copy without CUDA)", pin)(b)
    return time.process_time() - t0


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, default=COCO128, help="YOLO data YAML (default: ../shared coco128)")
    p.add_argument("--imgsz", type=int, default=640)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--images", type=int, default=384, help="images per loader, over all rounds")
    p.add_argument("--rounds", type=int, default=4, help="alternating rounds (ultralytics, fast, fast, ...)")
    p.add_argument("--loader", default="both", choices=["both", "ultralytics", "fast"])
    p.add_argument("--mosaic", type=float, default=1.0)
    args = p.parse_args(argv)

    import os
    import random

    from bench_loader import repeated_dataset

    from detector.data import datasets

    # read through symlinks, so the label cache is written there, not beside the dataset; removed at exit
    tmp = tempfile.TemporaryDirectory(prefix="bench-stages-")
    data_yaml = repeated_dataset(args.data, datasets.load(args.data).train_images, Path(tmp.name) / "mirror")
    loaders = ["ultralytics", "fast"] if args.loader == "both" else [args.loader]
    built = {name: build(data_yaml, name, args) for name in loaders}
    _patch_decode(list(built.values()))
    order = [random.randrange(len(next(iter(built.values())))) for _ in range(args.images)]
    chunk = -(-args.images // args.rounds)
    spent = {name: defaultdict(float) for name in loaders}
    total = dict.fromkeys(loaders, 0.0)
    for r in range(args.rounds):
        for name in loaders if r % 2 == 0 else loaders[::-1]:
            SPENT.clear()
            total[name] += run_chunk(built[name], order[r * chunk:(r + 1) * chunk], args.batch)
            for k, v in SPENT.items():
                spent[name][k] += v
    n = len(order)
    print(f"imgsz {args.imgsz}, mosaic {args.mosaic}, {n} images per loader in {args.rounds} alternating rounds, "
          f"load {os.getloadavg()[0]:.1f}, {args.data}\n")
    print("| stage | " + " | ".join(f"{name} CPU ms/image" for name in loaders) + " |")
    print("|---|" + "---:|" * len(loaders))
    stages = sorted({k for d in spent.values() for k in d}, key=lambda k: -max(d.get(k, 0) for d in spent.values()))
    for k in stages:
        print(f"| {k} | " + " | ".join(f"{1000 * spent[name].get(k, 0) / n:.2f}" for name in loaders) + " |")
    rest = [1000 * (total[name] - sum(spent[name].values())) / n for name in loaders]
    print("| rest (labels, Python glue) | " + " | ".join(f"{x:.2f}" for x in rest) + " |")
    print("| **total** | " + " | ".join(f"**{1000 * total[name] / n:.2f}**" for name in loaders) + " |")


if __name__ == "__main__":
    main()
