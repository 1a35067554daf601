"""The gradient noise scale (estimator, meter, record), time to accuracy and the recommendation.

The estimator is checked on synthetic Gaussian gradients with a known B_simple; the
real meter (detector.yolo.gradstats.GradNoise) against the exact value from every
example's own gradient of a small least-squares model at fixed weights; the record
on the shared tiny training; the report's words on run folders written through the
real Recorder (no training). The comparison with the exhaustive value on a real YOLO
is a benchmark, not a test: tools/bench_gradnoise.py (figures in docs/benchmarks.md).
"""

from __future__ import annotations

import csv
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from detector import gradnoise
from detector.record.writer import Recorder
from detector.report import prediction, recommend, timing
from detector.report import render as report
from tests.conftest import run_cli

LOSSES = ["box_loss", "cls_loss", "dfl_loss"]


# ---- the estimator ------------------------------------------------------------------------------------------

def _gaussian_batches(rng, n_batches: int, b: int, dim: int = 50):
    """Mean gradients of b examples drawn from N(G, diag(σ²)): true B_simple = Σσ² / |G|² = 40."""
    G = np.full(dim, 0.5)  # |G|² = 12.5
    sigma = np.sqrt(np.full(dim, 10.0))  # tr(Σ) = 500
    return G, [G + rng.normal(size=(b, dim)).mean(0) * sigma for _ in range(n_batches)]


def test_two_batch_estimators_recover_a_known_noise_scale():
    rng = np.random.default_rng(0)
    _, micro = _gaussian_batches(rng, 4000, b=8)
    acc = gradnoise.NoiseAverage()  # accumulation: 4 micro-batches of 8 and their step of 32
    for i in range(0, len(micro), 4):
        group = micro[i:i + 4]
        big = np.mean(group, axis=0)
        acc.add_group([(float(g @ g), 8) for g in group], float(big @ big), 32)
    assert acc.g2 == pytest.approx(12.5, rel=0.15)
    assert acc.trace == pytest.approx(500, rel=0.1)
    assert acc.b_simple == pytest.approx(40, rel=0.2)
    pair = gradnoise.NoiseAverage()  # accumulate = 1: consecutive pairs (here at the same weights: unbiased)
    for a, b in zip(micro[::2], micro[1::2]):
        big = (a + b) / 2
        pair.add_group([(float(a @ a), 8), (float(b @ b), 8)], float(big @ big), 16)
    assert pair.b_simple == pytest.approx(40, rel=0.25)


def test_estimator_edge_cases():
    g2, trace = gradnoise.two_batch(small_sq=3.0, b=1, big_sq=2.0, B=2)
    assert (g2, trace) == (1.0, 2.0)  # 2·2 − 3 = 1; (3 − 2) / (1 − 1/2) = 2
    with pytest.raises(ValueError):
        gradnoise.two_batch(1.0, 8, 1.0, 8)
    assert gradnoise.ratio(10.0, -1.0) is None  # no signal above the noise: no ratio, not a negative one
    # Exhaustive: 4 batches of 2 with |g|² mean 5 around a mean of |Ḡ|² 3: s² = 4/3·2, |G|² = 3 − s²/4.
    g2, trace, bs = gradnoise.exhaustive(5.0, 3.0, b=2, m=4)
    assert (g2, trace) == (pytest.approx(3 - 8 / 12), pytest.approx(16 / 3)) and bs == pytest.approx(trace / g2)
    empty = gradnoise.NoiseAverage()
    assert empty.b_simple is None and empty.g2 is None


def _groups(rng, steps: int, G_value: float):
    """NoiseAverage of accumulation steps (4 micro-batches of 8) around a true gradient of G_value per coordinate."""
    avg = gradnoise.NoiseAverage()
    for _ in range(steps):
        micro = [np.full(50, G_value) + rng.normal(size=(8, 50)).mean(0) * np.sqrt(10.0) for _ in range(4)]
        big = np.mean(micro, axis=0)
        avg.add_group([(float(g @ g), 8) for g in micro], float(big @ big), 32)
    return avg


def test_bounded_interval_holds_the_true_noise_scale():
    avg = _groups(np.random.default_rng(1), 100, 0.5)  # true B_simple = 500 / 12.5 = 40
    low, high = avg.interval()
    assert high is not None and low < 40 < high and low < avg.b_simple < high
    assert high / low < 2  # 100 steps resolve it
    assert avg.interval() == (low, high)  # deterministic: the same steps give the same interval
    assert gradnoise.NoiseAverage(avg.groups[:3]).interval() == (None, None)  # too few steps: no interval


def test_unbounded_interval_when_noise_dominates():
    avg = _groups(np.random.default_rng(2), 30, 0.02)  # true B_simple = 500 / 0.02 = 25,000 against B = 32
    low, high = avg.interval()
    assert high is None and low is not None and low >= 0  # empty high: unbounded, the noise hides |G|²


def test_prediction_arithmetic():
    """S/S_min = 1 + B_noise/B and E/E_min = 1 + B/B_noise, relative to the smallest candidate, over the interval."""
    assert gradnoise.steps_ratio(32, 16, 16) == pytest.approx(1.5 / 2)
    assert gradnoise.images_ratio(32, 16, 16) == pytest.approx(48 / 32)
    assert gradnoise.steps_ratio(64, 16, None) == 0.25 and gradnoise.images_ratio(64, 16, None) == 1.0
    pred = gradnoise.predict(32, 16, 16, low=8, high=None)
    assert pred["steps"] == (pytest.approx(0.75), pytest.approx(0.5), pytest.approx(1.25 / 1.5))
    assert pred["images"] == (pytest.approx(1.5), pytest.approx(1.0), pytest.approx(40 / 24))
    same = gradnoise.predict(16, 16, 100, low=50, high=200)
    assert same == {"steps": (1.0, 1.0, 1.0), "images": (1.0, 1.0, 1.0)}


# ---- the meter against exact per-example gradients -----------------------------------------------------------

class _Linear(torch.nn.Module):
    """Least squares called as Ultralytics' model is: model(batch) -> (loss x batch size, loss items)."""

    def __init__(self, dim: int):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(dim))

    def forward(self, batch):
        return self.loss(batch)

    def loss(self, batch, preds=None):
        x, y = batch["img"], batch["target"]
        mse = ((x @ self.w - y) ** 2).mean()
        return (mse * len(y)).reshape(1), {"mse": mse.detach()}


def _exact(model, x, y) -> tuple[float, float]:
    """|G|² and tr(Σ) at the current weights from every example's own gradient, exactly."""
    g = 2 * (x @ model.w.detach() - y)[:, None] * x  # per-example gradients of (w·x − y)²
    G = g.mean(0)
    return float(G @ G), float(((g - G) ** 2).sum(1).mean())


def _train_linear(accumulate: int, steps: int = 500, lr: float = 0.3, b: int = 16, split_budget: float = math.inf):
    """SGD on the linear model with the real GradNoise fed as the trainer feeds it; (epoch extras, exact, items).

    The weights move at every step (lr 0.3 against a curvature of 2: the gradient turns between
    steps), so a meter pairing consecutive steps is biased (it finds no |G|² at all here); the
    exact target is the ratio of the mean exact tr(Σ) and |G|² at the weights of each step.
    """
    from detector.yolo.callbacks import Progress
    from detector.yolo.gradstats import GradNoise

    gen = torch.Generator().manual_seed(0)
    n, dim = 4000, 20
    x = torch.randn(n, dim, generator=gen)
    y = x @ torch.full((dim,), 0.3) + 0.5 + torch.randn(n, generator=gen)
    model = _Linear(dim)
    scaler = SimpleNamespace(is_enabled=lambda: True, get_scale=lambda: 1024.0, scale=lambda t: t * 1024.0)  # AMP
    trainer = SimpleNamespace(model=model, world_size=1, scaler=scaler, epoch=0, accumulate=accumulate)
    meter = GradNoise(Progress(), split_budget=split_budget)  # the estimator itself: every step may split
    meter.on_pretrain_routine_end(trainer)
    meter.on_train_epoch_start(trainer)
    g2s, traces, items, norms, j = [], [], [], [], 0
    while len(g2s) < steps:
        order = torch.randperm(n, generator=gen)
        for start in range(0, n - b + 1, b):
            j += 1
            idx = order[start:start + b]
            meter.p.batch_size = b
            exact = _exact(model, x, y) if j % accumulate == 1 or accumulate == 1 else exact
            loss, item = model({"img": x[idx], "target": y[idx]})  # accumulate 1: the meter splits it in halves
            items.append((float(item["mse"]), float(((x[idx] @ model.w.detach() - y[idx]) ** 2).mean())))
            scaler.scale(loss.sum()).backward()
            if j % accumulate == 0:
                meter.before_step(trainer)
                with torch.no_grad():
                    model.w -= lr * model.w.grad / scaler.get_scale() / (b * accumulate)
                model.w.grad = None
                g2s.append(exact[0])
                traces.append(exact[1])
            meter.on_train_batch_end(trainer)
            norms.append(meter.p.iteration_extra["grad_norm"])
            if len(g2s) == steps:
                break
    meter.on_fit_epoch_end(SimpleNamespace())
    return meter.p.epoch_extra, sum(traces) / sum(g2s), items, norms


@pytest.mark.parametrize("accumulate", [1, 4])
def test_meter_agrees_with_exact_noise_scale_while_weights_move(accumulate):
    """Accumulate 4: micro-batches against their step; accumulate 1: the batch's halves against it, same weights."""
    extra, exact, items, norms = _train_linear(accumulate)
    estimate, low, high = (extra[k] for k in ("grad_noise_scale", "grad_noise_scale_low", "grad_noise_scale_high"))
    assert 10 < exact < 300, exact  # a regime the two-batch estimate can resolve
    assert high is not None and low <= exact <= high, (low, estimate, high, exact)  # the 90% interval holds it
    assert estimate == pytest.approx(exact, rel=0.15)
    assert all(v is not None and v > 0 for v in norms)
    # the trainer still logs the whole batch's loss (the halves' image-weighted mean)
    assert [a for a, _ in items] == pytest.approx([c for _, c in items], rel=1e-5)


def test_split_budget_limits_the_split_steps():
    """With no time to spend, only the first step (nothing spent yet) is split: one estimate, no interval."""
    extra, _, _, _ = _train_linear(1, steps=40, split_budget=0.0)
    assert extra["grad_noise_scale_low"] is None and extra["grad_noise_scale_high"] is None  # under 4 estimates
    everything, _, _, _ = _train_linear(1, steps=40)
    assert everything["grad_noise_scale_high"] is not None  # the same steps, all split: an interval


def test_pairing_consecutive_steps_would_fail_the_same_check():
    """The estimator the split replaced, on the same moving weights: consecutive steps as the large batch."""
    gen = torch.Generator().manual_seed(0)
    n, dim, b = 4000, 20, 16
    x = torch.randn(n, dim, generator=gen)
    y = x @ torch.full((dim,), 0.3) + 0.5 + torch.randn(n, generator=gen)
    model, avg, prev, g2s, traces = _Linear(dim), gradnoise.NoiseAverage(), None, [], []
    for _ in range(500):
        idx = torch.randint(0, n, (b,), generator=gen)
        g = (2 * (x[idx] @ model.w.detach() - y[idx])[:, None] * x[idx]).mean(0)
        g2, trace = _exact(model, x, y)
        g2s.append(g2)
        traces.append(trace)
        if prev is not None:
            big = (prev + g) / 2
            avg.add_group([(float(prev @ prev), b), (float(g @ g), b)], float(big @ big), 2 * b)
        prev = g
        with torch.no_grad():
            model.w -= 0.3 * g
    exact = sum(traces) / sum(g2s)
    assert avg.b_simple is None or not 0.5 < avg.b_simple / exact < 2, (avg.b_simple, exact)


def test_training_records_gradient_columns(tiny_run):
    """The shared real training measured every iteration, and B_simple in the epoch whose optimizer step completed."""
    with open(tiny_run / "iterations.csv", newline="") as f:
        norms = [float(r["grad_norm"]) for r in csv.DictReader(f)]
    assert len(norms) == 6 and all(math.isfinite(v) and v > 0 for v in norms)
    with open(tiny_run / "epochs.csv", newline="") as f:
        epochs = list(csv.DictReader(f))
    assert [e["epoch"] for e in epochs] == ["1", "2"]
    # 3 iterations per epoch; the warm-up ramps accumulate up, so epoch 2 ends an accumulated step (epoch 1 may not).
    done = [e for e in epochs if e["grad_trace_sigma"]]
    assert done and epochs[-1] in done
    assert {"grad_noise_scale_low", "grad_noise_scale_high"} <= set(epochs[0])  # 3 steps: too few for an interval
    for e in done:
        assert math.isfinite(float(e["grad_norm_sq"])) and float(e["grad_trace_sigma"]) > 0
        if float(e["grad_norm_sq"]) > 0:
            assert float(e["grad_noise_scale"]) == pytest.approx(
                float(e["grad_trace_sigma"]) / float(e["grad_norm_sq"]), rel=1e-3)


def test_no_grad_stats_leaves_the_columns_empty(tiny_data, tmp_path):
    result = run_cli(["train", "--data", str(tiny_data), "--epochs", "1", "--imgsz", "64", "--batch", "16",
                      "--project", str(tmp_path), "--name", "off", "--no-grad-stats", "plots=False", "val=False"],
                     tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    with open(tmp_path / "off" / "iterations.csv", newline="") as f:
        assert {r["grad_norm"] for r in csv.DictReader(f)} == {""}


# ---- fake runs for the report ---------------------------------------------------------------------------------

def fake_run(root, name, batch, seed=0, maps=(0.1, 0.3, 0.5), epoch_time=10.0, ips=40.0, noise=(80, 50, 30),
             status="completed", nbs=None, lr0=0.002, iters=5, imgsz=128, band=None, losses=None):
    """A run folder through the real Recorder: per-epoch mAP50-95 `maps`, fixed epoch time and throughput.

    band: per epoch (low, high) of B_simple's interval (high None: unbounded); losses: per epoch train loss terms.
    """
    nbs = nbs or batch
    run_dir = root / name
    run_dir.mkdir(parents=True)
    rec = Recorder(run_dir)
    sweep = {"sweep": root.name, "semantics": "true" if nbs == batch else "accumulate", "lr_scaling": None}
    rec.start({"name": name, "model": "yolo11n.yaml", "device": {"type": "cpu", "name": "cpu", "total_memory_gb": None},
               "config": {"seed": seed, "data": None, "epochs": len(maps), "imgsz": imgsz, "sweep": sweep,
                          "overrides": {"nbs": 16, "optimizer": "AdamW", "lr0": 0.002, "mosaic": 0.0},
                          "ultralytics": {"imgsz": imgsz, "epochs": len(maps), "batch": batch, "seed": seed}},
               "dataset": {"fingerprint": "fp"}, "batch": {"requested": str(batch), "chosen": batch},
               "nbs": nbs, "accumulate": max(round(nbs / batch), 1), "optimizer": "AdamW", "lr0": lr0,
               "iterations_per_epoch": iters})
    it = 0
    for e, m in enumerate(maps, 1):
        for k in range(1, iters + 1):
            it += 1
            row = {t: 1.0 for t in LOSSES}
            rec.iteration(LOSSES, {**row, "epoch": e, "iteration": it, "epoch_iteration": k, "batch_size": batch,
                                   "images_seen": it * batch, "optimizer_step": it, "loss": 3.0, "lr": 0.01,
                                   "time_s": it, "iter_time_s": 1, "data_time_s": 0.01, "grad_norm": 5.0})
        low, high = band[min(e, len(band)) - 1] if band else (None, None)
        terms = {f"train_{t}": losses[e - 1] / 3 for t in LOSSES} if losses else {}
        rec.epoch(LOSSES, {"epoch": e, "map50": m * 1.5, "map50_95": m, "epoch_time_s": epoch_time,
                           "images_per_s": ips, "grad_noise_scale": noise[min(e, len(noise)) - 1],
                           "grad_norm_sq": 1.0, "grad_trace_sigma": float(noise[min(e, len(noise)) - 1]),
                           "grad_noise_scale_low": low, "grad_noise_scale_high": high, **terms})
    if status == "running":
        rec.close()
    else:
        rec.finish(status, batch={"requested": str(batch), "chosen": batch, "used": batch})
    return run_dir


def test_time_to_accuracy_arithmetic(tmp_path):
    a = fake_run(tmp_path, "a", 16, maps=(0.1, 0.3, 0.5, 0.6), epoch_time=10.0, iters=5)
    b = fake_run(tmp_path, "b", 32, maps=(0.2, 0.25, 0.3, 0.35), epoch_time=7.0, iters=3)
    runs = report.load_runs([a, b])
    best, table = timing.table(runs)
    assert best == pytest.approx(0.6)
    r50, r90 = table["a"][0.5], table["a"][0.9]
    assert (r50.epoch, r50.time_s, r50.images, r50.steps) == (2, 20.0, 10 * 16, 10)  # 0.3 >= 0.30 at epoch 2
    assert (r90.epoch, r90.time_s, r90.images, r90.steps) == (4, 40.0, 20 * 16, 20)  # 0.54: only epoch 4 (0.6)
    assert table["b"][0.5].epoch == 3 and table["b"][0.5].time_s == pytest.approx(21.0)
    assert table["b"][0.9] is None
    _, rows = timing.rows(runs)
    assert rows[1][2] == "never" and "40 s, 320 images, 20 steps (epoch 4)" in rows[0][2]


def _sweep(tmp_path, spec):
    """spec: {(batch, seed): kwargs}; returns the comparison of those fake runs."""
    root = tmp_path / "sweep-x"
    dirs = [fake_run(root, f"b{b}-s{s}", b, seed=s, **kw) for (b, s), kw in spec.items()]
    return report.analyse(report.load_runs(dirs)), root


def test_recommendation_clear_winner(tmp_path):
    spec = {(16, s): {"maps": (0.1, 0.3, 0.40 + 0.01 * s)} for s in range(3)}
    spec.update({(32, s): {"maps": (0.1, 0.3, 0.55 + 0.012 * s), "ips": 60.0, "epoch_time": 8.0} for s in range(3)})
    comp, _ = _sweep(tmp_path, spec)
    rec = comp.recommendation
    assert rec.case == "clear" and rec.verdict.startswith("Use batch 32") and rec.command is None
    text = " ".join(rec.evidence)
    assert "not measured (CPU runs" in text and "16 40.0; batch 32 60.0" in text
    assert "B_simple is about 30" in text and "Held fixed" in text


def test_recommendation_within_noise_picks_the_fastest(tmp_path):
    noise = (0.0, 0.02, -0.015)
    spec = {(16, s): {"maps": (0.2, 0.45, 0.5 + noise[s])} for s in range(3)}
    spec.update({(64, s): {"maps": (0.2, 0.48, 0.5 - noise[s] * 0.8), "ips": 80.0, "epoch_time": 5.0}
                 for s in range(3)})
    comp, _ = _sweep(tmp_path, spec)
    rec = comp.recommendation
    assert rec.case == "within_noise", rec
    assert rec.verdict.startswith("Use batch 64") and "within the seed noise" in rec.verdict
    assert "batch 16 30 s; batch 64 10 s" in " ".join(rec.evidence)  # 90% of 0.52: epoch 3 vs epoch 2


@pytest.mark.parametrize("why", ["one seed", "unfinished"])
def test_recommendation_insufficient_evidence_prints_the_command(tmp_path, why):
    if why == "one seed":
        spec = {(16, 0): {"maps": (0.1, 0.3, 0.4)}, (32, 0): {"maps": (0.1, 0.3, 0.5)}}
    else:
        spec = {(b, s): {"maps": (0.1, 0.3, 0.45)} for b in (16, 32) for s in range(2)}
        spec[(32, 1)]["status"] = "running"
    comp, root = _sweep(tmp_path, spec)
    rec = comp.recommendation
    assert rec.case == "insufficient" and rec.verdict.startswith("Not enough evidence")
    assert ("one seed per batch size" if why == "one seed" else "b32-s1 did not finish") in rec.verdict
    assert rec.command.startswith("detector sweep --batch 16,32 --seeds 0,1,2 --semantics true --epochs 3 --imgsz 128")
    assert f"--name {root.name}" in rec.command and "nbs=" not in rec.command
    out = tmp_path / "out"
    report.compare([root], out)
    md = (out / "report.md").read_text(encoding="utf-8")
    assert md.index("## Recommendation") < md.index("## What kind of comparison")
    assert rec.command in md and "## Time to accuracy" in md and "noise_scale.png" in md
    page = (out / "report.html").read_text(encoding="utf-8")
    assert 'id="recommendation"' in page and "Time to accuracy" in page


def test_settle_command_repeats_the_sweep_with_three_seeds(tmp_path):
    root = tmp_path / "sweep-b16-32"
    argv = ["/venv/bin/detector", "sweep", "--batch", "16,32", "--seeds", "0", "--epochs", "3", "lr0=0.01"]
    dirs = [fake_run(root, f"b{b}-s0", b, maps=(0.1, 0.3, 0.4 + b / 1000)) for b in (16, 32)]
    for d in dirs:
        rec = Recorder(d)
        rec.merge("config", command=argv)
    rec = report.analyse(report.load_runs(dirs)).recommendation
    assert rec.case == "insufficient"
    assert rec.command == "detector sweep --seeds 0,1,2 --batch 16,32 --epochs 3 lr0=0.01"


def test_late_noise_scale_uses_the_last_third(tmp_path):
    run = report.load_runs([fake_run(tmp_path, "r", 16, maps=(0.1,) * 6, noise=(300, 200, 100, 60, 40, 20))])[0]
    assert prediction.late_noise(run).value == pytest.approx(30)
