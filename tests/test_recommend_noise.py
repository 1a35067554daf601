"""The recommendation when the runs learned nothing, the noise scale's interval in the report, and the prediction table.

Run folders are written through the real Recorder (tests/test_gradnoise.py's fake_run, no training) and read back
by the real report.
"""

from __future__ import annotations

import pytest

from detector.report import prediction
from detector.report import render as report
from tests.test_gradnoise import fake_run

FALLING = (9.0, 8.0, 7.0)  # training loss per epoch, still falling at the end


def _sweep(tmp_path, spec):
    root = tmp_path / "sweep-x"
    dirs = [fake_run(root, f"b{b}-s{s}", b, seed=s, **kw) for (b, s), kw in spec.items()]
    return report.analyse(report.load_runs(dirs)), root


@pytest.mark.parametrize("maps, rise, epochs", [((0.0, 0.002, 0.005), None, 10), ((0.0, 0.012, 0.03), 2, 8)])
def test_runs_that_learned_nothing_name_no_batch(tmp_path, maps, rise, epochs):
    spec = {(b, s): {"maps": maps, "losses": FALLING, "ips": 40.0 + b} for b in (16, 32) for s in (0, 1)}
    comp, root = _sweep(tmp_path, spec)
    rec = comp.recommendation
    assert rec.case == "not_learned", rec
    assert rec.verdict.startswith("No recommendation: the runs did not learn enough to compare")
    assert "Use batch" not in rec.verdict and "below the floor of 0.05" in rec.verdict
    assert "still falling" in rec.verdict
    assert (f"started to rise at epoch {rise}" if rise else "In these runs mAP50-95 never reached 0.01 in 3 epochs") in rec.verdict
    assert rec.command.startswith("detector sweep --batch 16,32 --seeds 0,1,2 --semantics true")
    assert rec.command.endswith(f"--epochs {epochs} --name sweep-x-e{epochs}")  # a folder of its own
    assert f"--project {root.parent}" in rec.command
    out = tmp_path / "out"
    report.compare([root], out)
    md = (out / "report.md").read_text(encoding="utf-8")
    assert rec.verdict in md and rec.command in md


def test_seed_spread_above_the_mean_is_not_learned(tmp_path):
    spec = {(16, 0): {"maps": (0.0, 0.01, 0.01)}, (16, 1): {"maps": (0.0, 0.05, 0.12)},
            (32, 0): {"maps": (0.0, 0.01, 0.02)}, (32, 1): {"maps": (0.0, 0.06, 0.11)}}
    rec = _sweep(tmp_path, spec)[0].recommendation
    assert rec.case == "not_learned" and "twice the seed spread" in rec.verdict


def test_loss_that_stopped_falling_is_said(tmp_path):
    spec = {(b, s): {"maps": (0.0, 0.0, 0.0), "losses": (7.0, 7.0, 7.0)} for b in (16, 32) for s in (0, 1)}
    rec = _sweep(tmp_path, spec)[0].recommendation
    assert rec.case == "not_learned" and "had stopped falling" in rec.verdict


def _noise_sentence(comp) -> str:
    return next(e for e in comp.recommendation.evidence if e.startswith("Gradient noise scale"))


def test_unbounded_interval_reads_unresolved(tmp_path):
    band = ((40.0, None),)  # every epoch: at least 40, unbounded above
    spec = {(b, s): {"maps": (0.1, 0.3, 0.5 + 0.01 * s), "band": band} for b in (16, 32) for s in range(3)}
    comp, root = _sweep(tmp_path, spec)
    text = _noise_sentence(comp)
    assert "B_simple is unresolved: at least 40, unbounded above" in text, text
    assert comp.noise.high is None and not comp.noise.resolved
    # unbounded: steps reach the limit B_ref/B = 0.5, images 1x
    assert comp.predicted[1].steps == (pytest.approx(0.674, abs=1e-3), pytest.approx(0.5), pytest.approx(2.25 / 3.5))
    out = tmp_path / "out"
    report.compare([root], out)  # the band, drawn to the top edge where unbounded
    assert (out / "plots" / "noise_scale.png").stat().st_size > 0


def test_bounded_interval_and_predicted_against_measured(tmp_path):
    band = ((20.0, 60.0),)
    spec = {(16, s): {"maps": (0.1, 0.3, 0.5 + 0.01 * s), "band": band, "iters": 8} for s in range(3)}
    spec.update({(32, s): {"maps": (0.1, 0.2, 0.5 + 0.01 * s), "band": band, "iters": 4, "ips": 60.0}
                 for s in range(3)})
    comp, root = _sweep(tmp_path, spec)
    text = _noise_sentence(comp)
    assert "B_simple is about 30 (90% interval 20 to 60)" in text, text
    # B_noise 30, B 32 against 16: steps (1 + 30/32) / (1 + 30/16), images (30 + 32) / (30 + 16)
    c = comp.predicted[1]
    assert c.steps[0] == pytest.approx(1.9375 / 2.875) and c.images[0] == pytest.approx(62 / 46)
    assert c.steps[1:] == (pytest.approx(2.875 / 4.75), pytest.approx(1.625 / 2.25))  # B_noise 60 and 20
    # predicted wall time: steps ratio x seconds per step (32/60 against 16/40)
    assert c.time == pytest.approx(1.9375 / 2.875 * (32 / 60) / (16 / 40))
    # measured: 50% of the best (0.52) is 0.3 at epoch 2 for batch 16 (16 steps), 0.52 at epoch 3 for 32 (12 steps)
    assert c.measured["steps"] == pytest.approx(12 / 16) and c.measured["time"] == pytest.approx(30 / 20)
    row = prediction.table(comp.predicted)[1]
    assert row[:4] == ["32", "32", "0.67x (0.61–0.72)", "1.35x (1.21–1.44)"] and row[5] == "0.75x"
    out = tmp_path / "out"
    report.compare([root], out)
    md = (out / "report.md").read_text(encoding="utf-8")
    assert "## Predicted from the noise scale" in md and "0.67x (0.61–0.72)" in md
