"""Benchmark `--batch auto`: the probe's time and decision table, beside Ultralytics' own AutoBatch.

    python tools/bench_batch.py                                   # yolo11n and yolo11s at imgsz 640, built-in data
    python tools/bench_batch.py --data ../shared/data/coco128/coco128.yaml --models yolo11n.yaml --imgsz 640

On a GPU, per model: the probe (real training steps with the dataset's densest
image's boxes x4, and the validation pass at twice the batch, for each candidate
from the smallest up) with its time and the table it decides from; then
Ultralytics' AutoBatch (batch=-1: synthetic images at batch 1..64, a line fitted
to their memory, 60% of the GPU as target) on the same model, with its time and
its choice. Without a GPU there is nothing to measure: it prints the plan per
candidate (iterations and optimizer steps per epoch) and says so.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


def _config(args, model: str):
    from detector.config import BatchOptions, TrainConfig, with_builtin_defaults

    config = TrainConfig(data=args.data, model=model, imgsz=args.imgsz, device=args.device,
                         batch=BatchOptions.parse("auto", args.candidates, args.safety))
    return with_builtin_defaults(config)


def bench_model(args, model: str, data, device: dict) -> None:
    """Probe and decide for one model; on a GPU also run Ultralytics' AutoBatch and time both."""
    import helpers
    from detector.errors import BatchError
    from detector.train import autobatch
    from detector.yolo import checks, probe

    config = _config(args, model)
    started = time.perf_counter()
    try:
        decision = autobatch.decide(config, data, device)
        print(f"\n{model} at imgsz {config.imgsz}: decided in {time.perf_counter() - started:.1f} s")
        print(autobatch.describe(decision))
    except BatchError as e:  # nothing fits: still a result worth printing
        print(f"\n{model} at imgsz {config.imgsz}: {e}")
    if device["type"] != "cuda":
        return
    index = probe.cuda_devices(config.device)[0]["index"]
    densest = autobatch.densest_labels(data)
    started = time.perf_counter()
    chosen = helpers.ultralytics_autobatch(checks.check_model(model), len(data.names), config.imgsz, index,
                                        max_num_obj=densest * 4, dataset_size=data.train_images)
    print(f"Ultralytics AutoBatch: batch {chosen} in {time.perf_counter() - started:.1f} s")


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=None, help="data YAML (default: the built-in dataset)")
    parser.add_argument("--models", default="yolo11n.yaml,yolo11s.yaml")
    parser.add_argument("--imgsz", type=int, default=640)
    parser.add_argument("--device", default=None)
    parser.add_argument("--candidates", default="16,32,64")
    parser.add_argument("--safety", type=float, default=0.85)
    args = parser.parse_args(argv)

    from detector.train import batching
    from detector.train.preflight import prepare
    from detector.yolo import checks

    config = _config(args, args.models.split(",")[0])
    config, data, _ = prepare(config)
    device = checks.device_info(args.device)
    where = "CPU" if device["type"] == "cpu" else f"{device['name']} ({device['total_memory_gb']:.1f} GB)"
    print(f"dataset {data.yaml}: {data.train_images} training images; device {where}")
    if device["type"] != "cuda":
        print("no GPU here: the probe measures CUDA memory, so there is nothing to time; the plan per candidate "
              "(what --batch auto would also show) follows, with 'auto' = 16 on CPU")
    for model in args.models.split(","):
        bench_model(args, model.strip(), data, device)
    print("\n" + batching.explain(data.train_images, config.nbs))


if __name__ == "__main__":
    main(sys.argv[1:])
