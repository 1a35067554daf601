"""Benchmark: what recording every iteration costs.

Times the same Ultralytics training (same data, epochs, seed, batch) three ways,
in rotation so drift hits all alike: Ultralytics' plain DetectionTrainer,
detector's trainer with recording switched off (it also carries detector's
single-threaded collate, a loader speed-up), and detector's trainer recording
every iteration. The recording overhead is recorded / unrecorded; the time spent
inside detector's own callbacks is summed as a second, direct measure. A fourth
training records without the gradient noise scale (--no-grad-stats): its cost is
recorded / that, and, directly, the time spent in the gradient meter's captures.

    python tools/bench_overhead.py                       # built-in dataset, 3 epochs, 3 pairs
    python tools/bench_overhead.py --data ../shared/data/coco128/coco128.yaml --imgsz 320 --epochs 1
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import helpers  # tools/helpers.py: prepares the runtime first

from detector import runtime
from detector.data import datasets
from detector.data import synth
from detector.record.writer import Recorder


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=None, help="data YAML (default: the built-in dataset)")
    ap.add_argument("--model", default="yolo11n.yaml")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--imgsz", type=int, default=128)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--pairs", type=int, default=3, help="rounds of the three trainings")
    return ap.parse_args()


def trainers() -> dict:
    """The trainers compared: plain Ultralytics, detector unrecorded, recorded without and with grad stats."""
    return {"Ultralytics": helpers.plain_trainer(), "unrecorded": helpers.unrecorded_trainer(),
            "no grad stats": None, "recorded": None}


def time_grad_meter(spent: list[float]) -> None:
    """Add the time of every gradient capture (optimizer_step and end of iteration) to spent[0]."""
    from detector.yolo import gradstats

    original = gradstats.GradNoise._capture

    def timed(self, *a, **k):
        t = time.perf_counter()
        try:
            return original(self, *a, **k)
        finally:
            spent[0] += time.perf_counter() - t

    gradstats.GradNoise._capture = timed


def main() -> None:
    args = parse_args()
    data_yaml = Path(args.data) if args.data else synth.ensure(synth.SynthSpec(), runtime.datasets_cache())
    from detector.yolo import recording

    callback_time, meter_time = [0.0], [0.0]
    helpers.time_recording_callbacks(callback_time)
    time_grad_meter(meter_time)
    variants = trainers()
    wall = {k: [] for k in variants}
    cpu = {k: [] for k in variants}  # process CPU time: less disturbed by other load than wall time
    shares, meter_shares = [], []
    with tempfile.TemporaryDirectory() as tmp:
        resolved = datasets.load(data_yaml).write_resolved(Path(tmp) / "data.yaml")
        base = {"data": str(resolved), "model": args.model, "epochs": args.epochs, "imgsz": args.imgsz,
                "batch": args.batch, "seed": 0, "deterministic": True, "workers": 0, "plots": False,
                "project": tmp, "exist_ok": True, "verbose": False}
        for i in range(args.pairs):
            keys = list(variants)
            for key in keys[i % len(keys):] + keys[:i % len(keys)]:  # rotate: a process's first training is slower
                name = f"{key.replace(' ', '-')}{i}"
                if key in ("recorded", "no grad stats"):
                    (Path(tmp) / name).mkdir()
                    rec = Recorder(Path(tmp) / name)
                    rec.start({"name": name, "config": {"grad_stats": key == "recorded"}})
                    callback_time[0] = meter_time[0] = 0.0
                t, c = time.perf_counter(), time.process_time()
                if key in ("recorded", "no grad stats"):
                    recording.train({**base, "name": name}, rec)
                else:
                    helpers.fit(variants[key], {**base, "name": name})
                wall[key].append(time.perf_counter() - t)
                cpu[key].append(time.process_time() - c)
                if key == "recorded":  # the other recorded variant resets the timers
                    spent = (callback_time[0], meter_time[0])
            shares.append(spent[0] / wall["recorded"][-1])
            meter_shares.append(spent[1] / wall["recorded"][-1])
            print(f"round {i + 1}: " + ", ".join(f"{k} {wall[k][-1]:.2f} s wall / {cpu[k][-1]:.2f} s CPU"
                                                 for k in variants)
                  + f"; in our callbacks {spent[0] * 1000:.0f} ms, in the gradient meter {spent[1] * 1000:.0f} ms",
                  flush=True)
    report(args, data_yaml, wall, cpu, shares, meter_shares)


def report(args, data_yaml, wall: dict, cpu: dict, shares: list[float], meter_shares: list[float]) -> None:
    med = statistics.median
    print(f"\ndata={data_yaml} model={args.model} imgsz={args.imgsz} batch={args.batch} epochs={args.epochs}")
    for label, table in (("wall", wall), ("CPU", cpu)):
        print(f"median {label} time: " + ", ".join(f"{k} {med(v):.2f} s" for k, v in table.items())
              + f"; recording overhead (recorded / unrecorded) {med(table['recorded']) / med(table['unrecorded']):.4f}"
              + f"; recorded / Ultralytics {med(table['recorded']) / med(table['Ultralytics']):.4f}")
        print(f"gradient noise scale ({label}): recorded / no grad stats "
              f"{med(table['recorded']) / med(table['no grad stats']):.4f}")
    print(f"time inside detector's callbacks: {med(shares) * 100:.2f}% of training wall time (median)")
    print(f"time inside the gradient meter's captures: {med(meter_shares) * 100:.2f}% of training wall time (median)")


if __name__ == "__main__":
    main()
