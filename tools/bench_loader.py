"""Benchmark the training data loader: images/s and peak RSS per pipeline, and RSS against dataset size.

Each configuration runs in a fresh process, so its peak RSS is its own:

  decode       cv2.imread + resize of the long side to imgsz, as Ultralytics' load_image does (the ceiling)
  stock        Ultralytics' training loader exactly as it ships (its own pipeline, Albumentations set and collate)
  default      what detector trains with: its fast loader (detector.yolo.fastload) with Ultralytics' default
               Albumentations set, i.e. the same augmentation as stock, and the single-threaded collate
  ultralytics-loader  detector with loader=ultralytics: the stock pipeline with detector's collate
  PRESET       the default loader with a detector preset: none, ultralytics, light, heavy
  FILE         the default loader with a pipeline file written by A.save

Rounds are paired: every round runs every configuration once, in alternating order, so a
busy spell on a shared machine hits them alike; the ratio to stock is taken within each round.
Images/s per core is images per CPU second of the loader (main process and workers together).

Examples:
  .venv/bin/python tools/bench_loader.py --imgsz 640 --workers 0 --pipelines stock,default --repeat 5
  .venv/bin/python tools/bench_loader.py --workers 2 --pipelines default,light,my_pipeline.yaml
  .venv/bin/python tools/bench_loader.py --stream-sizes 128,1280 --pipelines default   # RSS vs dataset size
  .venv/bin/python tools/bench_loader.py --per-transform --pipelines heavy,my_pipeline.yaml  # what costs what

Prints Markdown tables. Throughput excludes the first batch (worker start-up, label cache). The data is
read through a folder of symlinks, so Ultralytics' label cache is written there, never beside the dataset.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COCO128 = ROOT.parent / "shared" / "data" / "coco128" / "coco128.yaml"
BASELINES = {"decode", "stock", "default", "ultralytics-loader"}  # Ultralytics' default Albumentations set


def _peak_rss_mb() -> tuple[float, float]:
    """(this process's peak RSS, the sum of its live children's peak RSS) in MiB, from /proc (Linux)."""
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    children = 0.0
    for pid in _children():
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    children += int(line.split()[1]) / 1024
        except OSError:
            pass
    return own, children


def _children() -> list[str]:
    return [pid for task in Path(f"/proc/{os.getpid()}/task").iterdir()
            for pid in (task / "children").read_text().split()]


def _cpu_seconds() -> float:
    """CPU time of this process and its live children (loader workers): steadier than wall time on a busy machine."""
    total = time.process_time()
    tick = os.sysconf("SC_CLK_TCK")
    for pid in _children():
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / tick  # utime, stime
        except OSError:
            pass
    return total


def _decode_loader(files: list[str], imgsz: int, batch: int, workers: int):
    """Decode and resize only, through the same kind of torch DataLoader."""
    import cv2
    import torch

    cv2.setNumThreads(0)  # as Ultralytics sets it: one thread per loader process

    class Decode(torch.utils.data.Dataset):
        def __len__(self):
            return len(files)

        def __getitem__(self, i):
            im = cv2.imread(files[i])
            h, w = im.shape[:2]
            r = imgsz / max(h, w)
            if r != 1:
                size = (min(round(w * r), imgsz), min(round(h * r), imgsz))
                im = cv2.resize(im, size, interpolation=cv2.INTER_LINEAR)
            return im.shape[0]

    return torch.utils.data.DataLoader(Decode(), batch_size=batch, shuffle=True, num_workers=workers,
                                       collate_fn=lambda items: {"n": len(items)})


def step_cpu_ms(files: list[str], transforms, imgsz: int, passes: int = 4) -> float:
    """CPU ms per image of the Albumentations step alone, on real images and boxes at imgsz x imgsz."""
    import cv2
    import numpy as np

    from detector.data import datasets
    from detector.yolo import loader as yolo_loader

    step = yolo_loader.albumentations_step(transforms)
    samples = []
    for f in files[:32]:
        im = cv2.resize(cv2.imread(f), (imgsz, imgsz), interpolation=cv2.INTER_LINEAR)
        label = datasets.label_path(Path(f))
        rows = np.loadtxt(label, ndmin=2) if label.exists() and label.stat().st_size else np.zeros((0, 5))
        xywh = rows[:, 1:5] * imgsz
        # clipped to the image, as Ultralytics' random perspective leaves them (Albumentations refuses -1e-7)
        boxes = np.concatenate([xywh[:, :2] - xywh[:, 2:] / 2, xywh[:, :2] + xywh[:, 2:] / 2], 1).clip(0, imgsz)
        samples.append((im, boxes, rows[:, 0]))
    for im, boxes, cls in samples[:4]:  # warm-up
        step(im.copy(), boxes, cls)
    copies = [[im.copy() for im, _, _ in samples] for _ in range(passes)]  # copying is not the step's cost
    started = time.process_time()
    for batch in copies:
        for im, (_, boxes, cls) in zip(batch, samples):
            step(im, boxes, cls)
    return 1000 * (time.process_time() - started) / (passes * len(samples))


def per_transform(data_yaml: Path, pipelines: list[str], imgsz: int) -> None:
    """Print the Albumentations step's CPU ms/image for each transform of the pipelines, forced to p=1."""
    import albumentations as A

    from detector.augment import pipelines as augment
    from detector.data import datasets

    files = datasets.load(data_yaml).splits["train"]
    print("\n| transform (p=1) | from | step CPU ms/image | its p | expected ms/image at its p |")
    print("|---|---|---:|---:|---:|")
    baseline = step_cpu_ms(files, [], imgsz)
    print(f"| (empty list) | | {baseline:.2f} | | |")
    for pipe in pipelines:
        for t in augment.resolve(pipe, imgsz).transforms:
            body = t["transform"]
            forced = A.to_dict(A.from_dict({"transform": {**body, "p": 1.0}}))
            ms = step_cpu_ms(files, [forced], imgsz)
            p = float(body.get("p", 1.0))
            print(f"| {body['__class_fullname__']} | {Path(pipe).name} | {ms:.2f} | {p:g} | {ms * p:.2f} |",
                  flush=True)


def child(spec: dict) -> dict:
    """Measure one configuration in this process and return its figures."""
    from detector.augment import pipelines as augment
    from detector.data import datasets

    data = datasets.load(spec["data"])
    if spec["pipeline"] == "decode":
        loader = _decode_loader(data.splits["train"], spec["imgsz"], spec["batch"], spec["workers"])
    else:
        import helpers

        from detector.yolo import loader as yolo_loader

        transforms = None if spec["pipeline"] in BASELINES else list(
            augment.resolve(spec["pipeline"], spec["imgsz"]).transforms)
        which = "ultralytics" if spec["pipeline"] == "ultralytics-loader" else "fast"
        with tempfile.TemporaryDirectory() as tmp:
            data_yaml = data.write_resolved(Path(tmp) / "data.yaml")
            if spec["pipeline"] == "stock":
                _, loader, _ = helpers.stock_training_loader(data_yaml, spec["imgsz"], spec["batch"],
                                                             workers=spec["workers"],
                                                             overrides={"cache": spec["cache"],
                                                                        "mosaic": spec["mosaic"]})
            else:
                _, loader, _ = yolo_loader.training_loader(data_yaml, transforms, spec["imgsz"], spec["batch"],
                                                           workers=spec["workers"], loader=which,
                                                           overrides={"cache": spec["cache"],
                                                                      "mosaic": spec["mosaic"]})
    want = spec["images"] or data.train_images  # 0: exactly one pass over the training set
    seen, started, it = 0, None, iter(loader)
    batches = 0
    while seen < want:
        try:
            b = next(it)
        except StopIteration:
            it = iter(loader)
            continue
        n = b["n"] if "n" in b else len(b["im_file"])
        batches += 1
        if started is None:  # the first batch pays for worker start-up and label caching
            started, cpu0 = time.perf_counter(), _cpu_seconds()
            continue
        seen += n
    elapsed, cpu = time.perf_counter() - started, _cpu_seconds() - cpu0
    own, workers_rss = _peak_rss_mb()
    del loader, it  # stop the workers before timing the step alone
    step = None if spec["pipeline"] in BASELINES or not spec.get("step") else step_cpu_ms(
        data.splits["train"], transforms, spec["imgsz"])
    return {"pipeline": spec["pipeline"], "images": seen, "seconds": elapsed, "images_per_s": seen / elapsed,
            "cpu_ms_per_image": 1000 * cpu / seen, "step_cpu_ms": step,
            "peak_rss_mb": own, "workers_peak_rss_mb": workers_rss, "train_images": data.train_images}


def run_child(spec: dict) -> dict:
    """One configuration in a fresh interpreter, so ru_maxrss is its own."""
    out = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"{spec['pipeline']} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def repeated_dataset(data_yaml: Path, n: int, root: Path) -> Path:
    """A dataset of n training images: the source's images (and labels) symlinked over and over under root."""
    import yaml

    from detector.data import datasets

    src = datasets.load(data_yaml)
    (root / "images" / "train").mkdir(parents=True)
    (root / "labels" / "train").mkdir(parents=True)
    files = src.splits["train"]
    for i in range(n):
        image = Path(files[i % len(files)])
        name = f"{i:06d}_{image.stem}"
        (root / "images" / "train" / f"{name}{image.suffix}").symlink_to(image)
        label = datasets.label_path(image)
        if label.exists():
            (root / "labels" / "train" / f"{name}.txt").symlink_to(label)
    out = root / "data.yaml"
    out.write_text(yaml.safe_dump({"path": str(root), "train": "images/train", "val": "images/train",
                                   "names": {int(k): v for k, v in src.names.items()}}))
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, default=COCO128, help="YOLO data YAML (default: ../shared coco128)")
    p.add_argument("--imgsz", type=int, default=640)
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--images", type=int, default=256, help="images to time per configuration (after one warm-up batch)")
    p.add_argument("--repeat", type=int, default=1, help="paired rounds over all configurations; tables show medians")
    p.add_argument("--mosaic", type=float, default=1.0, help="Ultralytics' mosaic probability for every loader")
    p.add_argument("--cache", default=False, help="Ultralytics' cache option (False, ram, disk)")
    p.add_argument("--pipelines", default="decode,stock,default,ultralytics-loader,none,ultralytics,light,heavy",
                   help="comma-separated: decode, stock, default, ultralytics-loader, a preset, or a pipeline file")
    p.add_argument("--stream-sizes", default=None,
                   help="e.g. 128,1280: peak RSS for one pass over datasets of these sizes "
                        "(symlinked copies of --data)")
    p.add_argument("--per-transform", action="store_true",
                   help="instead: CPU cost of each transform of --pipelines alone, at p=1 (presets and files only)")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return
    base = {"imgsz": args.imgsz, "workers": args.workers, "batch": args.batch, "cache": args.cache,
            "mosaic": args.mosaic}
    pipelines = [x.strip() for x in args.pipelines.split(",") if x.strip()]
    print(f"imgsz {args.imgsz}, batch {args.batch}, workers {args.workers}, cache {args.cache}, mosaic {args.mosaic}, "
          f"{os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}, data {args.data}")
    if args.per_transform:
        per_transform(args.data, pipelines, args.imgsz)
        return
    if args.stream_sizes:
        print("\n| pipeline | dataset images | images read | images/s | peak RSS main (MiB) | peak RSS workers (MiB) |")
        print("|---|---:|---:|---:|---:|---:|")
        with tempfile.TemporaryDirectory(prefix="bench-loader-") as tmp:
            for n in (int(x) for x in args.stream_sizes.split(",")):
                data_yaml = repeated_dataset(args.data, n, Path(tmp) / f"n{n}")
                for pipe in pipelines:
                    r = run_child({**base, "data": str(data_yaml), "pipeline": pipe, "images": 0})
                    print(f"| {pipe} | {n} | {r['images']} | {r['images_per_s']:.0f} | {r['peak_rss_mb']:.0f} | "
                          f"{r['workers_peak_rss_mb']:.0f} |", flush=True)
        return
    with tempfile.TemporaryDirectory(prefix="bench-loader-") as tmp:
        from detector.data import datasets

        mirror = repeated_dataset(args.data, datasets.load(args.data).train_images, Path(tmp) / "mirror")
        runs = paired_rounds({**base, "data": str(mirror)}, pipelines, args.images, args.repeat)
    print_throughput(runs, args.repeat)
    if "stock" in runs:
        print_paired(runs)


def paired_rounds(base: dict, pipelines: list[str], images: int, repeat: int) -> dict[str, list[dict]]:
    """Every configuration once per round, the order reversed every other round (a drift in load cancels)."""
    runs: dict[str, list[dict]] = {pipe: [] for pipe in pipelines}
    for k in range(repeat):
        for pipe in pipelines if k % 2 == 0 else pipelines[::-1]:
            runs[pipe].append(run_child({**base, "pipeline": pipe, "images": images, "step": True}))
        print(f"round {k + 1}/{repeat}: " + ", ".join(f"{p} {rs[-1]['images_per_s']:.0f}/s" for p, rs in runs.items()),
              f"(load {os.getloadavg()[0]:.1f})", flush=True)
    return runs


def print_throughput(runs: dict[str, list[dict]], repeat: int) -> None:
    print(f"\n| pipeline | images/s (median of {repeat}) | all runs | loader CPU ms/image | "
          "loader CPU vs default | Albumentations step CPU ms/image | peak RSS main (MiB) | peak RSS workers (MiB) |")
    print("|---|---:|---|---:|---:|---:|---:|---:|")
    median = {pipe: statistics.median(r["images_per_s"] for r in rs) for pipe, rs in runs.items()}
    cpu = {pipe: statistics.median(r["cpu_ms_per_image"] for r in rs) for pipe, rs in runs.items()}
    default = cpu.get("default")
    for pipe, rs in runs.items():
        # CPU time per image is what a pipeline adds; wall-clock images/s also moves with the machine's other load
        rel = f"{100 * (cpu[pipe] / default - 1):+.1f}%" if default and pipe not in BASELINES else ""
        every = ", ".join(f"{r['images_per_s']:.0f}" for r in rs)
        steps = [r["step_cpu_ms"] for r in rs if r.get("step_cpu_ms") is not None]
        step = f"{statistics.median(steps):.2f}" if steps else ""
        print(f"| {pipe} | {median[pipe]:.0f} | {every} | {cpu[pipe]:.1f} | {rel} | {step} | "
              f"{max(r['peak_rss_mb'] for r in rs):.0f} | {max(r['workers_peak_rss_mb'] for r in rs):.0f} |")


def print_paired(runs: dict[str, list[dict]]) -> None:
    """Each configuration against stock, round by round: wall images/s and images per CPU second (per core)."""
    print("\n| pipeline | vs stock, images/s per round | median | images per CPU-s per round | median |")
    print("|---|---|---:|---|---:|")
    for pipe, rs in runs.items():
        if pipe in {"stock", "decode"}:
            continue
        wall = [r["images_per_s"] / s["images_per_s"] for r, s in zip(rs, runs["stock"])]
        core = [s["cpu_ms_per_image"] / r["cpu_ms_per_image"] for r, s in zip(rs, runs["stock"])]
        print(f"| {pipe} | {', '.join(f'{x:.2f}' for x in wall)} | **{statistics.median(wall):.2f}x** | "
              f"{', '.join(f'{x:.2f}' for x in core)} | **{statistics.median(core):.2f}x** |")

if __name__ == "__main__":
    main()
