"""Benchmark: what recording every iteration costs.

Times the same Ultralytics training (same data, epochs, seed, batch) with
detector's recording trainer and with Ultralytics' plain DetectionTrainer,
alternating them so drift hits both alike, and also sums the time spent inside
detector's own callbacks (the part the ratio is meant to bound).

    python tools/bench_overhead.py                       # built-in dataset, 3 epochs, 3 pairs
    python tools/bench_overhead.py --data ../shared/data/coco128/coco128.yaml --imgsz 320 --epochs 1
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from detector import datasets, runtime, synth  # noqa: E402
from detector.recorder import Recorder  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=None, help="data YAML (default: the built-in dataset)")
    ap.add_argument("--model", default="yolo11n.yaml")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--imgsz", type=int, default=128)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--pairs", type=int, default=3, help="alternating plain/recorded trainings")
    args = ap.parse_args()

    data_yaml = Path(args.data) if args.data else synth.ensure(synth.SynthSpec(), runtime.datasets_cache())
    from detector import yolo  # after runtime is prepared
    from ultralytics.models.yolo.detect import DetectionTrainer

    callback_time = [0.0]

    def timed(fn):
        def wrapper(*a, **k):
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                callback_time[0] += time.perf_counter() - t
        return wrapper

    class TimedTap(yolo._Tap):
        pass

    for name in ("on_pretrain_routine_end", "on_train_epoch_start", "on_train_batch_start", "on_train_batch_end",
                 "on_fit_epoch_end"):
        setattr(TimedTap, name, timed(getattr(yolo._Tap, name)))

    class TimedRecordingTrainer(yolo.RecordingTrainer):
        def __init__(self, *a, **k):
            orig = yolo._Tap
            yolo._Tap = TimedTap
            try:
                super().__init__(*a, **k)
            finally:
                yolo._Tap = orig

    with tempfile.TemporaryDirectory() as tmp:
        resolved = datasets.load(data_yaml).write_resolved(Path(tmp) / "data.yaml")
        base = {"data": str(resolved), "model": args.model, "epochs": args.epochs, "imgsz": args.imgsz,
                "batch": args.batch, "seed": 0, "deterministic": True, "workers": 0, "plots": False,
                "project": tmp, "exist_ok": True, "verbose": False}
        plain, recorded, shares = [], [], []
        for i in range(args.pairs):
            t = time.perf_counter()
            yolo.train({**base, "name": f"plain{i}"}, trainer=DetectionTrainer)
            plain.append(time.perf_counter() - t)
            (Path(tmp) / f"rec{i}").mkdir()
            Recorder(Path(tmp) / f"rec{i}").start({"name": f"rec{i}"})
            callback_time[0] = 0.0
            t = time.perf_counter()
            yolo.train({**base, "name": f"rec{i}"}, trainer=TimedRecordingTrainer)
            recorded.append(time.perf_counter() - t)
            shares.append(callback_time[0] / recorded[-1])
            print(f"pair {i + 1}: plain {plain[-1]:.2f} s, recorded {recorded[-1]:.2f} s, "
                  f"in our callbacks {callback_time[0] * 1000:.0f} ms", flush=True)
    ratio = statistics.median(recorded) / statistics.median(plain)
    print(f"\ndata={data_yaml} model={args.model} imgsz={args.imgsz} batch={args.batch} epochs={args.epochs}")
    print(f"median wall time: plain {statistics.median(plain):.2f} s, recorded {statistics.median(recorded):.2f} s, "
          f"ratio {ratio:.4f}")
    print(f"time inside detector's callbacks: {statistics.median(shares) * 100:.2f}% of training (median)")


if __name__ == "__main__":
    main()
