"""Benchmark: what recording every iteration costs.

Times the same Ultralytics training (same data, epochs, seed, batch) three ways,
in rotation so drift hits all alike: Ultralytics' plain DetectionTrainer,
detector's trainer with recording switched off (it also carries detector's
single-threaded collate, a loader speed-up), and detector's trainer recording
every iteration. The recording overhead is recorded / unrecorded; the time spent
inside detector's own callbacks is summed as a second, direct measure. A fourth
training records without the gradient noise scale (--no-grad-stats): its cost is
recorded / that, and, directly, the time spent in the gradient meter's captures.
With accumulate 1 (--nbs equal to --batch) the meter splits each step's batch in
halves: its cost is then mostly the two half-batch forward/backward passes that
replace one full one, which only the whole-training ratio shows; the time in the
split hook (the first half's forward, backward and capture) is printed as well.
--variants picks the trainings (e.g. "no grad stats,recorded" for the meter alone).

--step-timing measures the split directly, at fixed weights, which a loaded machine
disturbs far less than whole trainings: one recorded training of --epochs, then at
the end of its last epoch, for --steps training batches, one step's forward and
backward without the split (the trainer's full batch) and with it (the meter's hook:
two halves and their captures), alternating which goes first, --repeats times each;
the per-step ratio and the share of the last epoch's iterations it adds. The
meter's split budget (gradstats.SPLIT_BUDGET) is lifted while timing, so every
timed split step splits; the training itself runs under the budget.

    python tools/bench_overhead.py                       # built-in dataset, 3 epochs, 3 pairs
    python tools/bench_overhead.py --data ../shared/data/coco128/coco128.yaml --imgsz 320 --epochs 1
    python tools/bench_overhead.py --demo-settings --nbs 16 --imgsz 96 --epochs 4 --pairs 2 \
        --variants "no grad stats,recorded"              # accumulate 1: the split estimator's cost
    python tools/bench_overhead.py --demo-settings --nbs 16 --imgsz 96 --epochs 1 --step-timing
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import helpers  # tools/helpers.py: prepares the runtime first

from detector import runtime
from detector.config import BUILTIN_OVERRIDES
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
    ap.add_argument("--pairs", type=int, default=3, help="rounds of the trainings")
    ap.add_argument("--nbs", type=int, default=None,
                    help="nominal batch (default: Ultralytics' 64, or 16 with --demo-settings); "
                         "equal to --batch for accumulate 1")
    ap.add_argument("--demo-settings", action="store_true",
                    help="the built-in demo's overrides, as `detector train` applies them on the built-in dataset "
                         "(nbs 16, AdamW lr0 0.002, warmup 1 epoch, no mosaic)")
    ap.add_argument("--variants", default=None,
                    help="comma-separated subset of: Ultralytics, unrecorded, no grad stats, recorded (default: all)")
    ap.add_argument("--step-timing", action="store_true",
                    help="time one step's forward and backward with and without the accumulate-1 split at fixed "
                         "weights, after a recorded training of --epochs (needs nbs = batch)")
    ap.add_argument("--steps", type=int, default=12, help="--step-timing: training batches timed")
    ap.add_argument("--repeats", type=int, default=3, help="--step-timing: times each batch is timed each way")
    return ap.parse_args()


def trainers() -> dict:
    """The trainers compared: plain Ultralytics, detector unrecorded, recorded without and with grad stats."""
    return {"Ultralytics": helpers.plain_trainer(), "unrecorded": helpers.unrecorded_trainer(),
            "no grad stats": None, "recorded": None}


def _timed_method(name: str, spent: list[float]) -> None:
    """Add the time of every call of GradNoise.<name> to spent[0]."""
    from detector.yolo import gradstats

    original = getattr(gradstats.GradNoise, name)

    def timed(self, *a, **k):
        t = time.perf_counter()
        try:
            return original(self, *a, **k)
        finally:
            spent[0] += time.perf_counter() - t

    setattr(gradstats.GradNoise, name, timed)


def time_grad_meter(spent: list[float]) -> None:
    """Add the time of every gradient capture (optimizer_step and end of iteration) to spent[0]."""
    _timed_method("_capture", spent)


def time_split(spent: list[float]) -> None:
    """Add the time of the accumulate-1 split hook (the first half's forward, backward, capture) to spent[0]."""
    _timed_method("_split", spent)


def step_timing(args, data_yaml: Path) -> None:
    """Full-batch step against the split step at fixed weights, interleaved; see the module docstring."""
    from detector.yolo import recording

    out: dict = {}

    class Timing(recording.RecordingTrainer):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            self.add_callback("on_train_epoch_start", self._epoch_start)
            self.add_callback("on_train_epoch_end", self._time)

        def _epoch_start(self, trainer):
            out["epoch_start"] = time.perf_counter()

        def _time(self, trainer):
            if trainer.epoch + 1 != args.epochs:
                return
            out["iteration"] = (time.perf_counter() - out["epoch_start"]) / len(trainer.train_loader)
            out.update(time_steps(trainer, args.steps, args.repeats))

    with tempfile.TemporaryDirectory() as tmp:
        resolved = datasets.load(data_yaml).write_resolved(Path(tmp) / "data.yaml")
        extra = dict(BUILTIN_OVERRIDES) if args.demo_settings else {}
        extra["nbs"] = args.nbs or args.batch
        overrides = {**extra, "data": str(resolved), "model": args.model, "epochs": args.epochs,
                     "imgsz": args.imgsz, "batch": args.batch, "seed": 0, "deterministic": True, "workers": 0,
                     "plots": False, "project": tmp, "name": "run", "exist_ok": True, "verbose": False}
        (Path(tmp) / "run").mkdir()
        rec = Recorder(Path(tmp) / "run")
        rec.start({"name": "run", "config": {"grad_stats": True}})
        recording.train(overrides, rec, trainer_cls=Timing)
    med = statistics.median
    full, split = out["full"], out["split"]
    print(f"\ndata={data_yaml} model={args.model} imgsz={args.imgsz} batch={args.batch} "
          f"nbs={extra['nbs']} epochs={args.epochs}; {len(full['wall'])} timed steps each way")
    for label in ("wall", "cpu"):
        ratios = [b / a for a, b in zip(full[label], split[label])]
        print(f"{label}: full-batch step {med(full[label]) * 1000:.0f} ms, split step {med(split[label]) * 1000:.0f} ms "
              f"(medians); split / full per step: median {med(ratios):.3f}, "
              f"quartiles {statistics.quantiles(ratios, n=4)[0]:.3f}-{statistics.quantiles(ratios, n=4)[2]:.3f}")
    added = med(split["wall"]) - med(full["wall"])
    it = out["iteration"]
    print(f"the split adds {added * 1000:.0f} ms per split step: {added / max(it, 1e-9) * 100:.1f}% of the last "
          f"epoch's mean iteration ({it * 1000:.0f} ms, loader and optimizer included, trained with the meter as "
          "it is, within its split budget if it has one); validation dilutes it further")


def time_steps(trainer, steps: int, repeats: int) -> dict:
    """At the trainer's current weights: wall and CPU seconds of one step's forward and backward, both ways."""
    import itertools

    from detector.yolo import gradstats

    meter = trainer.grad_meter
    budget = getattr(gradstats, "SPLIT_BUDGET", None)
    if budget is not None:  # the timed steps must all split: lift the meter's time budget while timing
        gradstats.SPLIT_BUDGET = float("inf")
    model = trainer.model.module if hasattr(trainer.model, "module") else trainer.model
    saved = {k: v.clone() for k, v in model.state_dict().items() if "running_" in k or "num_batches" in k}
    avg, accumulate = meter.avg, trainer.accumulate
    params = [q for q in model.parameters() if q.requires_grad]
    res = {k: {"wall": [], "cpu": []} for k in ("full", "split")}
    model.train()

    def one(batch, split: bool) -> None:
        for q in params:
            q.grad = None
        trainer.accumulate = 1 if split else 0  # 0: the meter's hook passes the batch through unsplit
        t, c = time.perf_counter(), time.process_time()
        loss, _ = trainer.model(batch)
        loss.sum().backward()
        if split:
            meter.before_step(trainer)
            meter.on_train_batch_end(trainer)
        res["split" if split else "full"]["wall"].append(time.perf_counter() - t)
        res["split" if split else "full"]["cpu"].append(time.process_time() - c)

    try:
        for j, batch in enumerate(itertools.islice(trainer.train_loader, steps)):
            batch = trainer.preprocess_batch(batch)
            for r in range(repeats):
                order = (False, True) if (j + r) % 2 == 0 else (True, False)
                for split in order:
                    one(batch, split)
    finally:
        if budget is not None:
            gradstats.SPLIT_BUDGET = budget
        trainer.accumulate, meter.avg = accumulate, avg
        for q in params:
            q.grad = None
        model.load_state_dict(saved, strict=False)
    return res


def main() -> None:
    args = parse_args()
    if args.step_timing:
        data_yaml = Path(args.data) if args.data else synth.ensure(synth.SynthSpec(), runtime.datasets_cache())
        return step_timing(args, data_yaml)
    data_yaml = Path(args.data) if args.data else synth.ensure(synth.SynthSpec(), runtime.datasets_cache())
    from detector.yolo import recording

    callback_time, meter_time, split_time = [0.0], [0.0], [0.0]
    helpers.time_recording_callbacks(callback_time)
    time_grad_meter(meter_time)
    time_split(split_time)
    variants = trainers()
    if args.variants:
        keep = [v.strip() for v in args.variants.split(",")]
        unknown = [v for v in keep if v not in variants]
        if unknown or not keep:
            raise SystemExit(f"unknown variants {unknown}: choose from {list(variants)}")
        variants = {k: variants[k] for k in keep}
    wall = {k: [] for k in variants}
    cpu = {k: [] for k in variants}  # process CPU time: less disturbed by other load than wall time
    shares, meter_shares, split_shares = [], [], []
    spent = (0.0, 0.0, 0.0)
    with tempfile.TemporaryDirectory() as tmp:
        resolved = datasets.load(data_yaml).write_resolved(Path(tmp) / "data.yaml")
        extra = dict(BUILTIN_OVERRIDES) if args.demo_settings else {}
        if args.nbs:
            extra["nbs"] = args.nbs
        base = {**extra, "data": str(resolved), "model": args.model, "epochs": args.epochs, "imgsz": args.imgsz,
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
                    callback_time[0] = meter_time[0] = split_time[0] = 0.0
                t, c = time.perf_counter(), time.process_time()
                if key in ("recorded", "no grad stats"):
                    recording.train({**base, "name": name}, rec)
                else:
                    helpers.fit(variants[key], {**base, "name": name})
                wall[key].append(time.perf_counter() - t)
                cpu[key].append(time.process_time() - c)
                if key == "recorded":  # the other recorded variant resets the timers
                    spent = (callback_time[0], meter_time[0], split_time[0])
            if "recorded" in wall:
                shares.append(spent[0] / wall["recorded"][-1])
                meter_shares.append(spent[1] / wall["recorded"][-1])
                split_shares.append(spent[2] / wall["recorded"][-1])
            print(f"round {i + 1}: " + ", ".join(f"{k} {wall[k][-1]:.2f} s wall / {cpu[k][-1]:.2f} s CPU"
                                                 for k in variants)
                  + f"; in our callbacks {spent[0] * 1000:.0f} ms, in the gradient meter {spent[1] * 1000:.0f} ms"
                  + f" (split hook, first half's pass included, {spent[2] * 1000:.0f} ms)", flush=True)
    report(args, data_yaml, wall, cpu, shares, meter_shares, split_shares)


def report(args, data_yaml, wall: dict, cpu: dict, shares: list[float], meter_shares: list[float],
           split_shares: list[float]) -> None:
    med = statistics.median

    def ratio(table, a, b) -> str:
        return f"{med(table[a]) / med(table[b]):.4f}" if a in table and b in table else "–"

    def paired(table, a, b) -> str:  # the ratio within each round, then its median
        if a not in table or b not in table:
            return "–"
        return "/".join(f"{x / y:.4f}" for x, y in zip(table[a], table[b]))

    nbs = args.nbs or (BUILTIN_OVERRIDES["nbs"] if args.demo_settings else 64)
    print(f"\ndata={data_yaml} model={args.model} imgsz={args.imgsz} batch={args.batch} nbs={nbs} "
          f"(accumulate {max(round(nbs / args.batch), 1)}) epochs={args.epochs} demo settings={args.demo_settings}")
    for label, table in (("wall", wall), ("CPU", cpu)):
        print(f"median {label} time: " + ", ".join(f"{k} {med(v):.2f} s" for k, v in table.items())
              + f"; recording overhead (recorded / unrecorded) {ratio(table, 'recorded', 'unrecorded')}"
              + f"; recorded / Ultralytics {ratio(table, 'recorded', 'Ultralytics')}")
        print(f"gradient noise scale ({label}): recorded / no grad stats {ratio(table, 'recorded', 'no grad stats')}"
              f" (per round {paired(table, 'recorded', 'no grad stats')})")
    if shares:
        print(f"time inside detector's callbacks: {med(shares) * 100:.2f}% of training wall time (median)")
        print(f"time inside the gradient meter's captures: {med(meter_shares) * 100:.2f}% of training wall time "
              "(median)")
        print(f"time inside the split hook (first half's forward and backward, and its capture): "
              f"{med(split_shares) * 100:.2f}% of training wall time (median)")


if __name__ == "__main__":
    main()
