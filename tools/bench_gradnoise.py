"""Benchmark: the gradient noise scale measured during training against the exhaustive value.

Trains the built-in demo (AdamW; nbs 16 = batch: accumulate 1, or --nbs 64: accumulate 4)
at a tiny imgsz with the gradient meter on, and at the end of chosen epochs stops to
measure B_simple at those live weights (tools/gradcheck.py): exhaustively over every
training image (several shuffled passes at the training batch, with a 95% bootstrap
interval) and through the meter's own code at fixed weights (each batch split in
halves, and accumulation groups). The epoch's in-training value (epochs.csv
grad_noise_scale, with its 90% interval) averages over the epoch's changing weights.

    python tools/bench_gradnoise.py                         # built-in dataset, imgsz 64, 6 epochs, accumulate 1
    python tools/bench_gradnoise.py --epochs 20 --at 6,20 --nbs 64 --out gn.json
"""

from __future__ import annotations

import argparse
import csv
import json
import tempfile
import time
from pathlib import Path

import helpers  # noqa: F401  (tools/helpers.py: prepares the runtime first)

from detector import runtime
from detector.config import BUILTIN_OVERRIDES
from detector.data import datasets
from detector.data import synth
from detector.record.writer import Recorder


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=None, help="data YAML (default: the built-in dataset)")
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--at", default="1,3,6", help="epochs at whose end B_simple is measured at fixed weights")
    ap.add_argument("--imgsz", type=int, default=64)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--nbs", type=int, default=None, help="nominal batch (default: the batch, so accumulate 1)")
    ap.add_argument("--passes", type=int, default=4, help="shuffled passes over the training set per measurement")
    ap.add_argument("--group", type=int, default=4, help="micro-batches per step in the accumulation check")
    ap.add_argument("--out", default=None, help="also write the epochs.csv rows and the measurements to this JSON file")
    return ap.parse_args()


def main() -> None:
    args = parse_args()
    at = {int(x) for x in args.at.split(",")}
    data_yaml = Path(args.data) if args.data else synth.ensure(synth.SynthSpec(), runtime.datasets_cache())
    import gradcheck  # tools/gradcheck.py
    from detector.yolo import recording

    measured: dict[int, dict] = {}

    class Checking(recording.RecordingTrainer):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            self.add_callback("on_train_epoch_end", self._check)

        def _check(self, trainer):
            epoch = trainer.epoch + 1
            if epoch in at:
                t = time.perf_counter()
                measured[epoch] = gradcheck.measure(trainer, trainer.train_loader, args.passes, args.group)
                measured[epoch]["seconds"] = time.perf_counter() - t
                print(f"epoch {epoch}: {measured[epoch]}", flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        resolved = datasets.load(data_yaml).write_resolved(Path(tmp) / "data.yaml")
        overrides = {**BUILTIN_OVERRIDES, "nbs": args.nbs or args.batch, "data": str(resolved), "model": "yolo11n.yaml",
                     "epochs": args.epochs, "imgsz": args.imgsz, "batch": args.batch, "seed": 0, "workers": 0,
                     "plots": False, "project": tmp, "name": "run", "exist_ok": True, "verbose": False}
        (Path(tmp) / "run").mkdir()
        rec = Recorder(Path(tmp) / "run")
        rec.start({"name": "run"})
        start = time.perf_counter()
        recording.train(overrides, rec, trainer_cls=Checking)
        wall = time.perf_counter() - start
        with open(Path(tmp) / "run" / "epochs.csv", newline="") as f:
            rows = {int(r["epoch"]): r for r in csv.DictReader(f)}
    if args.out:  # before the table, so a report error loses nothing
        Path(args.out).write_text(json.dumps({"args": vars(args), "wall_s": wall, "epochs": rows,
                                              "measured": measured}, indent=1, default=str))
    report(args, data_yaml, rows, measured, wall)


def _f(v) -> str:
    return "–" if v in (None, "") else f"{float(v):.1f}"


def _iv(low, high) -> str:
    if low in (None, ""):
        return "–"
    return f"{float(low):.0f}–" + ("∞" if high in (None, "") else f"{float(high):.0f}")


def report(args, data_yaml, rows: dict, measured: dict, wall: float) -> None:
    nbs = args.nbs or args.batch
    print(f"\ndata={data_yaml} imgsz={args.imgsz} batch={args.batch} nbs={nbs} (accumulate "
          f"{max(round(nbs / args.batch), 1)}) epochs={args.epochs} passes={args.passes}; training with checks took "
          f"{wall:.0f} s")
    print("| epoch | in training: B_simple (90%) | exhaustive at the epoch's end: B_simple (95%) | meter at fixed "
          f"weights, halves (90%) | meter, groups of {args.group} (90%) | in training within the exhaustive interval |")
    print("|---|---|---|---|---|---|")
    for e in sorted(rows):
        r, m = rows[e], measured.get(e)
        cells = [str(e), f"{_f(r['grad_noise_scale'])} ({_iv(r.get('grad_noise_scale_low'), r.get('grad_noise_scale_high'))})"]
        if m:
            v, lo, hi = r["grad_noise_scale"], m["exact_low"], m["exact_high"]
            inside = "–" if v in (None, "") else ("yes" if lo <= float(v) and (hi is None or float(v) <= hi) else "no")
            cells += [f"{_f(m['exact_b_simple'])} ({_iv(lo, hi)})", f"{_f(m['split_b_simple'])} ({_iv(*m['split_interval'])})",
                      f"{_f(m['acc_b_simple'])} ({_iv(*m['acc_interval'])})", inside]
        else:
            cells += [""] * 4
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
