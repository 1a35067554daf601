"""Benchmark: the gradient noise scale measured during training against the exhaustive value.

Trains the built-in demo (nbs 16 = batch: accumulate 1, AdamW) at a tiny imgsz with
the gradient meter on, and at the end of chosen epochs stops to measure B_simple at
those live weights (tools/gradcheck.py): exhaustively over every training image
(several shuffled passes at the training batch) and through the meter's own code at
fixed weights (consecutive pairs, and accumulation groups). The epoch's in-training
value (epochs.csv grad_noise_scale) averages over the epoch's changing weights.

    python tools/bench_gradnoise.py                         # built-in dataset, imgsz 64, 6 epochs
    python tools/bench_gradnoise.py --epochs 10 --at 2,5,10 --passes 6
"""

from __future__ import annotations

import argparse
import csv
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
    ap.add_argument("--passes", type=int, default=4, help="shuffled passes over the training set per measurement")
    ap.add_argument("--group", type=int, default=4, help="micro-batches per step in the accumulation check")
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
        overrides = {**BUILTIN_OVERRIDES, "nbs": args.batch, "data": str(resolved), "model": "yolo11n.yaml",
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
    report(args, data_yaml, rows, measured, wall)


def _f(v) -> str:
    return "–" if v in (None, "") else f"{float(v):.1f}"


def report(args, data_yaml, rows: dict, measured: dict, wall: float) -> None:
    print(f"\ndata={data_yaml} imgsz={args.imgsz} batch={args.batch} (accumulate 1) epochs={args.epochs} "
          f"passes={args.passes}; training with checks took {wall:.0f} s")
    print("| epoch | in training: B_simple (|G|², tr Σ) | fixed weights: exhaustive B_simple (|G|², tr Σ) | "
          "meter, pairs | meter, groups of %d | in-training / exhaustive | pairs / exhaustive |" % args.group)
    print("|---|---|---|---|---|---|---|")
    for e in sorted(rows):
        r, m = rows[e], measured.get(e)
        cells = [str(e), f"{_f(r['grad_noise_scale'])} ({_f(r['grad_norm_sq'])}, {_f(r['grad_trace_sigma'])})"]
        if m:
            ex = m["exact_b_simple"]
            ratio = (float(r["grad_noise_scale"]) / ex) if ex and r["grad_noise_scale"] else None
            pr = m["pair_b_simple"] / ex if ex and m["pair_b_simple"] else None
            cells += [f"{_f(ex)} ({_f(m['exact_g2'])}, {_f(m['exact_trace'])})", _f(m["pair_b_simple"]),
                      _f(m["acc_b_simple"]), "–" if ratio is None else f"{ratio:.2f}",
                      "–" if pr is None else f"{pr:.2f}"]
        else:
            cells += [""] * 5
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
