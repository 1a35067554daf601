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
from detector.report import recommend, timing
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


# ---- the meter against exact per-example gradients -----------------------------------------------------------

class _Linear(torch.nn.Module):
    """Least squares with Ultralytics' loss scale: the batch's mean loss times the batch size."""

    def __init__(self, dim: int):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(dim))

    def loss(self, x, y):
        return ((x @ self.w - y) ** 2).mean() * len(y)


def _exact(model, x, y) -> float:
    """B_simple from every example's own gradient: tr(Σ) / |G|², exactly."""
    g = 2 * (x @ model.w.detach() - y)[:, None] * x  # per-example gradients of (w·x − y)²
    G = g.mean(0)
    return float(((g - G) ** 2).sum(1).mean() / (G @ G))


@pytest.mark.parametrize("accumulate", [1, 4])
def test_meter_agrees_with_exact_per_example_noise_scale(accumulate):
    """The real GradNoise listener, fed as the trainer feeds it, on a model whose per-example gradients are exact."""
    from detector.yolo.callbacks import Progress
    from detector.yolo.gradstats import GradNoise

    gen = torch.Generator().manual_seed(0)
    n, dim, b = 4000, 20, 16
    x = torch.randn(n, dim, generator=gen)
    y = x @ torch.full((dim,), 0.3) + 0.5 + torch.randn(n, generator=gen)  # the offset keeps |G|² well above 0
    model = _Linear(dim)
    exact = _exact(model, x, y)
    scaler = SimpleNamespace(is_enabled=lambda: True, get_scale=lambda: 1024.0)  # AMP: grads arrive scaled
    trainer = SimpleNamespace(model=model, world_size=1, scaler=scaler, epoch=0)
    meter = GradNoise(Progress())
    meter.on_pretrain_routine_end(trainer)
    meter.on_train_epoch_start(trainer)
    norms = []
    for _ in range(3):  # passes at fixed weights: no optimizer step changes w
        order = torch.randperm(n, generator=gen)
        for j, start in enumerate(range(0, n, b), 1):
            idx = order[start:start + b]
            (model.loss(x[idx], y[idx]) * 1024.0).backward()
            meter.p.batch_size = len(idx)
            if j % accumulate == 0:
                meter.before_step(trainer)
                model.w.grad = None  # optimizer.zero_grad()
            meter.on_train_batch_end(trainer)
            norms.append(meter.p.iteration_extra["grad_norm"])
    meter.on_fit_epoch_end(SimpleNamespace())
    estimate = meter.p.epoch_extra["grad_noise_scale"]
    assert 5 < exact < 200, exact  # a regime the two-batch estimate can resolve: B_simple within 2-10x of b
    assert 0.5 <= estimate / exact <= 2, (estimate, exact)
    assert estimate == pytest.approx(exact, rel=0.3)
    assert all(v is not None and v > 0 for v in norms)


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
             status="completed", nbs=None, lr0=0.002, iters=5, imgsz=128):
    """A run folder through the real Recorder: per-epoch mAP50-95 `maps`, fixed epoch time and throughput."""
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
        rec.epoch(LOSSES, {"epoch": e, "map50": m * 1.5, "map50_95": m, "epoch_time_s": epoch_time,
                           "images_per_s": ips, "grad_noise_scale": noise[min(e, len(noise)) - 1],
                           "grad_norm_sq": 1.0, "grad_trace_sigma": float(noise[min(e, len(noise)) - 1])})
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
    assert recommend.late_noise_scale(run) == pytest.approx(30)
