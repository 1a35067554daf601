"""Benchmark: per-image CPU latency of a detector in PyTorch against its ONNX export in ONNX Runtime.

For each image size and batch size, exports a static ONNX model of that shape
(as `detector export` does), then times the fused PyTorch model and an
onnxruntime session on the same random input: warm-up calls first, then the
median of --repeat calls, divided by the batch size.

    python tools/bench_export.py          # a fresh yolo11n.yaml model, imgsz 320 and 640, batch 1 and 8
    python tools/bench_export.py --weights runs/shapes/weights/best.pt --imgsz 128 --repeat 20

Weights do not change latency, so an untrained yolo11n (saved to a temporary
.pt) stands in for a trained one when --weights is not given.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path


def _race(fns: dict, x, warmup: int, repeat: int) -> dict:
    """Median milliseconds per call of each function, calls alternating so load from elsewhere hits all alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn(x)
    times = {name: [] for name in fns}
    for _ in range(repeat):
        for name, fn in fns.items():
            t = time.perf_counter()
            fn(x)
            times[name].append((time.perf_counter() - t) * 1000)
    return {name: statistics.median(ts) for name, ts in times.items()}


def bench(weights: Path, imgsz: int, batch: int, workdir: Path, warmup: int, repeat: int, threads: int) -> dict:
    """Per-image milliseconds of PyTorch and ONNX Runtime for one (imgsz, batch) shape."""
    import numpy as np

    from detector.deploy import export
    from detector.yolo import inference

    pt = workdir / f"{weights.stem}-{imgsz}-b{batch}.pt"
    pt.write_bytes(weights.read_bytes())  # each shape exports beside its own copy, so files never collide
    onnx_file = inference.export_model(pt, "onnx", imgsz, batch=batch)
    x = np.random.default_rng(0).random((batch, 3, imgsz, imgsz), dtype=np.float32)
    ms = _race({"pt": inference.torch_forward(weights, imgsz), "onnx": export.onnx_forward(onnx_file, threads)},
               x, warmup, repeat)
    return {"imgsz": imgsz, "batch": batch, "pt": ms["pt"] / batch, "onnx": ms["onnx"] / batch}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", type=Path, default=None, help="a .pt (default: a fresh --model saved to .pt)")
    parser.add_argument("--model", default="yolo11n.yaml", help="model YAML used when --weights is not given")
    parser.add_argument("--imgsz", type=int, nargs="+", default=[320, 640])
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--threads", type=int, default=os.cpu_count(),
                        help="CPU threads for both runtimes (Ultralytics alone would leave PyTorch one thread fewer)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench-export-") as tmp:
        os.environ.setdefault("DETECTOR_HOME", str(Path(tmp) / "home"))  # never the user's settings
        import onnxruntime
        import torch

        import helpers

        torch.set_num_threads(args.threads)  # after Ultralytics' import, which lowers it
        weights = args.weights or helpers.save_fresh_model(args.model, Path(tmp) / f"{Path(args.model).stem}.pt")
        rows = [bench(weights, s, b, Path(tmp), args.warmup, args.repeat, args.threads)
                for s in args.imgsz for b in args.batch]
    print(f"\n{weights.name}: CPU, torch {torch.__version__} and onnxruntime {onnxruntime.__version__}, "
          f"{args.threads} threads each; median of {args.repeat} alternating calls after {args.warmup} warm-up\n")
    print("| imgsz | batch | PyTorch ms/image | ONNX Runtime ms/image | speed-up |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['imgsz']} | {r['batch']} | {r['pt']:.1f} | {r['onnx']:.1f} | {r['pt'] / r['onnx']:.2f}x |")


if __name__ == "__main__":
    main()
