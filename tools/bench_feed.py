"""GPU feed benchmark: the share of time a GPU would wait for data, Ultralytics' stock loader against detector's.

A consumer takes each batch from the training loader (coco128, batch 16, imgsz 640, the
loader's workers) and holds it for the training step time of a named GPU and model,
sleeping as the training process mostly does while the GPU works; the time it spends in
next() is the time that GPU would sit idle. The wait share is wait / (wait + steps).
Each loader runs in its own process, pinned with `taskset` to the first N cores (N = 2,
then 8) and started with N workers, as `detector train` chooses them on a GPU; the two
loaders alternate over --repeat rounds and each cell is the median. Core counts above
what this machine grants are reported as not measured.

Step times (batch 16, imgsz 640, mixed precision) are estimates derived from published figures:

  T4 forward latency per image: Ultralytics' YOLO11 table, "Speed T4 TensorRT10 (ms)" at 640
  (https://docs.ultralytics.com/models/yolo11/): yolo11n 1.5, yolo11s 2.5, yolo11m 4.7 ms.
  A training step is taken as 3 forward passes (the backward pass costs about two) for each of
  the 16 images; A100 and H100 scale the T4 figure by memory bandwidth (NVIDIA's datasheets:
  T4 320 GB/s, A100 80GB SXM 2,039 GB/s, H100 SXM 3,350 GB/s), since these small convolution
  nets are bound by memory traffic more than by tensor-core FLOPs.

The TensorRT latency is lower than eager PyTorch's, so real steps are probably longer and the
waits shorter; --step-ms replaces the table with a measured step (e.g. the median step of a run's
iterations.csv, iter_time_s - data_time_s).

  .venv/bin/python tools/bench_feed.py                         # 2 and 8 cores, T4/A100/H100 x n/s/m
  .venv/bin/python tools/bench_feed.py --cores 2 --gpus T4 --models yolo11n --batches 24
  .venv/bin/python tools/bench_feed.py --step-ms 90 --cores 2  # one measured step time instead
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COCO128 = ROOT.parent / "shared" / "data" / "coco128" / "coco128.yaml"
SOURCE = "https://docs.ultralytics.com/models/yolo11/ (T4 TensorRT10 latency), NVIDIA datasheets (bandwidth)"
T4_LATENCY_MS = {"yolo11n": 1.5, "yolo11s": 2.5, "yolo11m": 4.7}  # per image, 640, FP16, batch 1
BANDWIDTH_GBS = {"T4": 320, "A100": 2039, "H100": 3350}
TRAIN_PASSES = 3  # forward + backward, in forward passes
LOADERS = ("stock", "detector")


def step_ms(gpu: str, model: str, batch: int = 16) -> float:
    """The estimated training step of model on gpu at imgsz 640 (see the module docstring)."""
    return batch * TRAIN_PASSES * T4_LATENCY_MS[model] * BANDWIDTH_GBS["T4"] / BANDWIDTH_GBS[gpu]


def build(loader: str, data_yaml: Path, imgsz: int, batch: int, workers: int):
    """The training loader as each side trains with it: Ultralytics' as shipped, or detector's."""
    if loader == "stock":
        import helpers

        return helpers.stock_training_loader(data_yaml, imgsz, batch, workers=workers)[1]
    from detector.yolo import loader as yolo_loader

    return yolo_loader.training_loader(data_yaml, None, imgsz, batch, workers=workers, loader="fast")[1]


def endless(loader):
    """Batches without end (Ultralytics' loader stops after one epoch per iter(), its workers do not)."""
    while True:
        yield from loader


def consume(it, steps_s: list[float], settle: int, batches: int) -> tuple[float, float]:
    """(seconds waited in next(), seconds held) over `batches` batches, after `settle` unmeasured ones."""
    waited = held = 0.0
    for k in range(settle + batches):
        t = time.perf_counter()
        next(it)
        got = time.perf_counter()
        time.sleep(steps_s[k % len(steps_s)])
        if k >= settle:
            waited += got - t
            held += time.perf_counter() - got
    return waited, held


def child(spec: dict) -> dict:
    """One loader on the cores this process was pinned to: images/s alone, then the wait under each step time."""
    loader = build(spec["loader"], Path(spec["data"]), spec["imgsz"], spec["batch"], spec["workers"])
    it = endless(loader)
    next(it)  # worker start-up, label cache
    settle = spec["workers"] * 4 + 2  # Ultralytics' prefetch_factor is 4: drain what was queued meanwhile
    t = time.perf_counter()
    for _ in range(spec["batches"]):
        next(it)
    alone = spec["batches"] * spec["batch"] / (time.perf_counter() - t)
    out = {"loader": spec["loader"], "images_per_s": alone, "wait": {}}
    for key, ms in spec["steps"].items():
        waited, held = consume(it, [ms / 1000], settle, spec["batches"])
        out["wait"][key] = waited / (waited + held)
    return out


def run_child(spec: dict, cores: int) -> dict:
    cmd = [sys.executable, __file__, "--child", json.dumps(spec)]
    out = subprocess.run(["taskset", "-c", f"0-{cores - 1}", *cmd], capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"{spec['loader']} on {cores} cores failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, default=COCO128, help="YOLO data YAML (default: ../shared coco128)")
    p.add_argument("--imgsz", type=int, default=640)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--cores", default="2,8", help="comma-separated core counts (taskset), one worker per core")
    p.add_argument("--gpus", default="T4,A100,H100")
    p.add_argument("--models", default="yolo11n,yolo11s,yolo11m")
    p.add_argument("--step-ms", type=float, default=None, help="one measured step time instead of the table")
    p.add_argument("--batches", type=int, default=16, help="measured batches per step time (after settling)")
    p.add_argument("--repeat", type=int, default=2,
                   help="rounds per core count, the loaders' order reversed every other round; cells show medians")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return
    if args.step_ms:
        steps = {f"measured {args.step_ms:g} ms": args.step_ms}
    else:
        steps = {f"{g} {m}": step_ms(g, m, args.batch) for g in args.gpus.split(",") for m in args.models.split(",")}
    usable = len(os.sched_getaffinity(0))
    print(f"imgsz {args.imgsz}, batch {args.batch}, {usable} usable cores, load {os.getloadavg()[0]:.1f}; "
          f"step times from {SOURCE}")
    results: dict[int, dict[str, dict]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-feed-") as tmp:
        from bench_loader import repeated_dataset

        from detector.data import datasets

        mirror = repeated_dataset(args.data, datasets.load(args.data).train_images, Path(tmp) / "mirror")
        for cores in (int(c) for c in args.cores.split(",")):
            if cores > usable:
                print(f"{cores} cores: not measured, this machine grants {usable}")
                continue
            spec = {"data": str(mirror), "imgsz": args.imgsz, "batch": args.batch, "workers": cores,
                    "batches": args.batches, "steps": steps}
            rounds: dict[str, list[dict]] = {name: [] for name in LOADERS}
            for k in range(args.repeat):
                for name in LOADERS if k % 2 == 0 else LOADERS[::-1]:
                    rounds[name].append(run_child({**spec, "loader": name}, cores))
                print(f"{cores} cores, round {k + 1}: " + ", ".join(
                    f"{n} {r[-1]['images_per_s']:.0f} images/s alone" for n, r in rounds.items())
                      + f" (load {os.getloadavg()[0]:.1f})", flush=True)
            results[cores] = {name: {"wait": {key: statistics.median(r["wait"][key] for r in rs) for key in steps}}
                              for name, rs in rounds.items()}
    print_table(steps, results, [int(c) for c in args.cores.split(",")])


def print_table(steps: dict, results: dict, cores: list[int]) -> None:
    head = "".join(f" {c} cores: stock | {c} cores: detector |" for c in cores)
    print(f"\n| GPU, model | step ms (batch 16) |{head}")
    print("|---|---:|" + "---:|---:|" * len(cores))
    for key, ms in steps.items():
        cells = "".join(
            f" {100 * results[c]['stock']['wait'][key]:.0f}% | {100 * results[c]['detector']['wait'][key]:.0f}% |"
            if c in results else " not measured | not measured |" for c in cores)
        print(f"| {key} | {ms:.0f} |{cells}")


if __name__ == "__main__":
    main()
