"""The memory model against real trainings: tests/data/gpu_memory_calibration.csv (70 published GPU_mem figures).

CI runs one row per (model, image size) group, the group's median batch, so that every
architecture and size is held to the real figure in about two minutes; the whole set is
`tools/bench_memory.py --only calibration` (its table is in docs/benchmarks.md). The
issue's targets (typical within ±15% on 80% of rows, bound at or above the real figure on
90% and never above 1.6x) are not met yet: the assertions below guard what the model
reaches now, so that a change can only move it closer.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _bench():
    spec = importlib.util.spec_from_file_location("tools_bench_memory", ROOT / "tools" / "bench_memory.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_rows_are_readable_and_units_follow_the_version():
    bm = _bench()
    from detector.yolo import memcauses

    rows = bm.calibration_rows()
    assert len(rows) >= 30
    for row in rows:
        assert row["source"].startswith("https://")
        unit = memcauses.gpu_mem_unit(row["ultralytics"])
        assert (row["unit"] == "GiB") == (unit == 2**30), row["id"]
        settings, batch = bm.row_settings(row)
        assert settings.model.endswith(".yaml") and batch >= 1 and settings.train_boxes >= 1
        assert settings.train_boxes_high >= settings.train_boxes


def test_densest_image_estimate_grows_with_the_epoch():
    bm = _bench()
    one = bm.densest_of(10.0, 1000, 4)
    assert 10 < one < bm.densest_of(10.0, 100000, 4) < 60
    assert bm.densest_of(0.0, 100, 4) == 1


@pytest.fixture(scope="module")
def results():
    bm = _bench()
    rows = [r for r in bm.calibration_rows() if r["id"] not in bm.UNUSABLE]
    groups: dict = {}
    for row in rows:
        groups.setdefault((bm.row_arch(row["model"]), row["imgsz"]), []).append(row)
    picked = [sorted(g, key=lambda r: int(r["batch"]))[len(g) // 2] for g in groups.values()]
    return bm, bm.calibrate(picked)


def test_prediction_against_real_trainings(results):
    bm, got = results
    s = bm.summary(got)
    assert s["rows"] >= 15
    for r in got:
        typical, high, real = r["later"]
        assert 0 < typical <= high, r["id"]
        assert typical > 0.25 * real, r["id"]  # the densest rows (syringes, 220 boxes per image) read 3.5x low
    # What the model reaches now (see the module docstring): a regression guard, not the target.
    assert s["within_15pct"] >= 0.3 * s["rows"]
    assert s["max_bound_over_real"] <= 2.5  # the lunar-crater rows: the 100-epoch box tail overshoots
