"""The GPU memory model: plan times, its accuracy against published figures, and (on a GPU) against the probe.

    .venv/bin/python tools/bench_memory.py              # times + accuracy table (no GPU needed)
    .venv/bin/python tools/bench_memory.py --only accuracy
    .venv/bin/python tools/bench_memory.py --measure    # on a CUDA machine: predicted vs measured, 11n/11s x 16/32/64

Times are wall and CPU seconds of a whole plan (model build + three candidates)
in this process; RSS is the process's peak. Published figures are Ultralytics'
GPU_mem column (memory_reserved at an epoch's last batch): GB (1e9) up to 8.3.75,
GiB from 8.3.76. The first epoch has only training in the cache, later epochs
also the validation pass, so they are compared with predicted training and peak.
"""

from __future__ import annotations

import argparse
import resource
import time

from detector import runtime

runtime.prepare()

# (model, imgsz, batch, classes, GPU, Ultralytics, first epoch, later epochs (low, high), unit bytes)
PUBLISHED = [
    ("yolo11s.yaml", 640, 8, 3, "RTX 3090", "8.3.74", 2.25, (2.33, 2.35), 1e9),
    ("yolo11m.yaml", 640, 25, 3, "RTX 3090", "8.3.74", 13.0, (13.1, 13.2), 1e9),
    ("yolo11n.yaml", 640, 16, 10, "RTX 3050 Laptop 6 GB", "8.3.77", 2.39, (2.32, 2.54), 2**30),
]
# The datasets behind the published rows are unknown: assume 10 boxes on the densest image,
# so 40 per training image after mosaic, as --batch auto's label load would give.
ASSUMED_DENSEST = 10


def settings(model: str, imgsz: int, nc: int, densest: int = ASSUMED_DENSEST, **kw):
    from detector import facts
    from detector.yolo import memory

    return memory.MemorySettings(model=model, nc=nc, imgsz=imgsz, train_boxes=facts.boxes_per_training_image(densest, {}),
                                 val_boxes=densest, **kw)


def timed_plan(model: str, imgsz: int = 640, candidates=(16, 32, 64)) -> dict:
    """Wall and CPU seconds of a plan of three candidates, and the peak RSS so far."""
    from detector.yolo import memory

    wall, cpu = time.perf_counter(), time.process_time()
    mm = memory.MemoryModel(settings(model, imgsz, 80))
    preds = [mm.predict(b) for b in candidates]
    return {"model": model, "imgsz": imgsz, "candidates": list(candidates),
            "wall_s": round(time.perf_counter() - wall, 1), "cpu_s": round(time.process_time() - cpu, 1),
            "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
            "peaks_gib": [round(p.peak_gb, 2) for p in preds]}


def accuracy() -> list[str]:
    """The published rows against predictions, as Markdown table lines."""
    from detector.yolo import memory

    lines = [("| model | imgsz | batch | classes | GPU | Ultralytics | published first / later | predicted training / "
              "peak (same unit) | error first / later |"), "|---|---|---|---|---|---|---|---|---|"]
    for model, imgsz, batch, nc, gpu, version, first, later, unit in PUBLISHED:
        p = memory.MemoryModel(settings(model, imgsz, nc)).predict(batch)
        train, peak = p.train_gb * 2**30 / unit, p.peak_gb * 2**30 / unit
        mid = sum(later) / 2
        name = "GB" if unit == 1e9 else "GiB"
        lines.append(f"| {model.removesuffix('.yaml')} | {imgsz} | {batch} | {nc} | {gpu} | {version} | "
                     f"{first} / {later[0]}-{later[1]} {name} | {train:.2f} / {peak:.2f} {name} | "
                     f"{(train / first - 1):+.0%} / {(peak / mid - 1):+.0%} |")
        print(lines[-1], f"  ({p.seconds:.1f} s; breakdown GiB {p.breakdown})", flush=True)
    return lines


def measure() -> list[str]:
    """On CUDA: the probe's measured peaks beside the model's, yolo11n and yolo11s at 640 x 16/32/64."""
    import torch

    from detector.yolo import memory, probe

    if not torch.cuda.is_available():
        raise SystemExit("--measure needs a CUDA GPU")
    gpu = probe.cuda_devices("0")[0]
    lines = [(f"GPU: {gpu['name']}, {gpu['total_memory_gb']:.1f} GiB, in use before the probe (CUDA context): "
              f"{gpu['baseline_gb']:.2f} GiB (model: {memory.CUDA_CONTEXT_GB:.2f})"), "",
             "| model | batch | measured train / val reserved GiB | predicted | measured allocated | predicted |",
             "|---|---|---|---|---|---|"]
    for model in ("yolo11n.yaml", "yolo11s.yaml"):
        mm = memory.MemoryModel(settings(model, 640, 80))
        got = probe.probe_batch_memory(model, 80, 640, (16, 32, 64), 0, 4 * ASSUMED_DENSEST, ASSUMED_DENSEST)
        for m in got:
            p = mm.predict(m["batch"])
            lines.append(f"| {model} | {m['batch']} | {m.get('train_peak_gb')} / {m.get('val_peak_gb')} | "
                         f"{p.train_gb:.2f} / {p.val_gb:.2f} | {m.get('allocated_peak_gb')} | "
                         f"{max(p.train_allocated_gb, p.val_allocated_gb):.2f} |")
            print(lines[-1], flush=True)
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", choices=["times", "accuracy"], default=None)
    ap.add_argument("--measure", action="store_true", help="on a CUDA GPU: predicted against measured")
    args = ap.parse_args()
    import detector.yolo  # noqa: F401  (hermetic Ultralytics)

    if args.measure:
        print("\n".join(measure()))
        return
    if args.only in (None, "times"):
        for model in ("yolo11n.yaml", "yolo11x.yaml"):
            print(timed_plan(model), flush=True)
    if args.only in (None, "accuracy"):
        print("\n".join(accuracy()))


if __name__ == "__main__":
    main()
