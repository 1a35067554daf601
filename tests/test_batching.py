"""--batch auto: the pure decision (tables), the plan arithmetic, `detector batch`, and out-of-memory step-down.

There is no GPU here: the decision is tested as the pure function it is; the probe's
steps run on CPU with the small GPU faked by tests/fakes.py (out-of-memory injected at the seams); training
step-down runs a real tiny training whose fake device raises PyTorch's real
out-of-memory error.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from detector import config, facts
from detector.train import autobatch
from detector.train import batching
from detector.data import datasets
from detector.train.batching import Measurement as M
from detector.cli import main
from detector.errors import BatchError, UsageError

from .conftest import run_cli
from .fakes import small_gpu

REAL_OOM = ("CUDA out of memory. Tried to allocate 2.00 MiB. GPU 0 has a total capacity of 7.79 GiB of which "
            "1.06 MiB is free. Of the allocated memory 6.90 GiB is allocated by PyTorch")


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


# -- plan arithmetic ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n, batch, nbs, iterations, accumulate, steps, per_step", [
    (128, 16, 64, 8, 4, 2, 64),
    (128, 32, 64, 4, 2, 2, 64),
    (128, 64, 64, 2, 1, 2, 64),
    (40, 16, 64, 3, 4, 0.75, 64),  # 16 + 16 + 8 images; a step every 4 iterations, across epochs
    (40, 8, 16, 5, 2, 2.5, 16),  # epochs alternate 3 and 2 steps
    (400, 16, 64, 25, 4, 6.25, 64),  # the built-in dataset at Ultralytics' nbs: 6 or 7 steps per epoch
    (400, 64, 16, 7, 1, 7, 64),  # batch above nbs: every iteration is a step
    (100, 24, 64, 5, 3, 1.67, 72),  # round(64 / 24) = 3
])
def test_plan_row(n, batch, nbs, iterations, accumulate, steps, per_step):
    row = batching.plan_row(n, batch, nbs)
    assert (row.iterations_per_epoch, row.accumulate, row.optimizer_steps_per_epoch, row.images_per_step) == (
        iterations, accumulate, steps, per_step)


def test_cpu_auto_is_16_with_the_plan_of_every_candidate():
    d = batching.decide_cpu("auto", 128)
    assert d.chosen == 16 and "no CUDA device" in d.reason
    assert [(r.batch, r.iterations_per_epoch, r.optimizer_steps_per_epoch) for r in d.table] == [
        (16, 8, 2), (32, 4, 2), (64, 2, 2)]
    assert d.summary()["table"][0]["fits"] is None  # nothing measured on CPU


# -- the GPU decision -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("measurements, total, safety, chosen", [
    ([M(16, 3.0, 4.0), M(32, 6.0, 7.9), M(64, 12.0, 15.0)], 16.0, 0.85, 32),  # 64 over 13.6 GB
    ([M(16, 3.0, 4.0), M(32, 6.0, 7.9), M(64, 12.0, 13.5)], 16.0, 0.85, 64),
    ([M(16, 3.0, 4.0), M(32, 6.0, 7.9), M(64, 12.0, 13.7)], 16.0, 0.85, 32),
    ([M(16, 3.0, 4.0), M(32, 6.0, 7.9), M(64, oom="training")], 16.0, 0.85, 32),
    ([M(16, 3.0, 4.0), M(32, 6.0, oom="validation")], 16.0, 0.85, 16),  # training fit, validation at 64 did not
    ([M(16, 3.0, 7.0), M(32, 6.0, 14.0)], 16.0, 0.85, 16),  # validation at 2x decides, not training
    ([M(16, 3.0, 4.0)], 80.0, 0.85, 16),  # larger candidates never probed: not chosen
    ([M(16, 2.0, 8.0)], 10.0, 0.8, 16),  # exactly at the budget fits
    ([M(16, 2.0, 4.0), M(32, 4.0, 8.0), M(64, 8.0, 16.0)], 16.0, 1.0, 64),  # safety 1.0 allowed
])
def test_decide_gpu_table(measurements, total, safety, chosen):
    d = batching.decide_gpu(measurements, total, safety, (16, 32, 64), n_images=128)
    assert d.chosen == chosen
    fits = {r.batch: r.fits for r in d.table}
    assert [b for b, ok in fits.items() if ok] == [b for b in (16, 32, 64) if b <= chosen]
    assert f"batch {chosen} is the largest candidate" in d.reason


def test_decide_gpu_just_over_the_budget_does_not_fit():
    with pytest.raises(BatchError):
        batching.decide_gpu([M(16, 2.0, 8.0001)], 10.0, 0.8, (16, 32, 64), n_images=128)


def test_decide_gpu_memory_in_use_elsewhere_shrinks_the_budget():
    ms = [M(16, 3.0, 4.0), M(32, 6.0, 7.9)]
    assert batching.decide_gpu(ms, 10.0, 0.85, (16, 32), 128).chosen == 32
    d = batching.decide_gpu(ms, 10.0, 0.85, (16, 32), 128, baseline_gb=1.0)  # 8.5 - 1.0 < 7.9
    assert d.chosen == 16 and "1.00 GB already in use" in d.reason


def test_decide_gpu_table_rows_record_figures_and_notes():
    d = batching.decide_gpu([M(16, 3.0, 4.0, allocated_peak_gb=3.5), M(32, 6.0, oom="validation")], 16.0,
                            0.85, (16, 32, 64), n_images=128)
    rows = {r["batch"]: r for r in d.summary()["table"]}
    assert rows[16] | {"note": None} == rows[16]  # the chosen row has no note
    assert (rows[16]["train_peak_gb"], rows[16]["val_peak_gb"], rows[16]["peak_gb"]) == (3.0, 4.0, 4.0)
    assert rows[16]["allocated_peak_gb"] == 3.5
    assert (rows[16]["iterations_per_epoch"], rows[16]["optimizer_steps_per_epoch"]) == (8, 2)
    assert rows[32]["fits"] is False and rows[32]["note"] == "out of memory in validation at batch 64"
    assert rows[64]["fits"] is False and rows[64]["note"].startswith("not probed")


def test_decide_gpu_ignores_a_larger_batch_after_one_that_did_not_fit():
    # Memory grows with the batch; a fit above a failure means the measurement is wrong.
    d = batching.decide_gpu([M(16, 3.0, 4.0), M(32, 6.0, 20.0), M(64, 6.0, 7.0)], 16.0, 0.85, (16, 32, 64), 128)
    assert d.chosen == 16
    assert {r.batch: r.note for r in d.table}[64] == "ignored: the smaller batch 32 did not fit"


def test_decide_gpu_several_gpus_decides_per_gpu_and_hands_ultralytics_the_total():
    ms = [M(16, 3.0, 4.0), M(32, 6.0, 7.9), M(64, oom="training")]
    d = batching.decide_gpu(ms, 16.0, 0.85, (16, 32, 64), n_images=1000, devices=2, device_name="GPU 1 (T4)")
    assert d.chosen == 64  # 32 per GPU x 2
    assert [(r.batch, r.per_device_batch) for r in d.table] == [(32, 16), (64, 32), (128, 64)]
    row = d.table[1]
    assert (row.iterations_per_epoch, row.accumulate) == (16, 1)  # ceil(1000 / 64), round(64 / 64)
    assert "gives each GPU 64 // 2 = 32" in d.reason and "GPU 1 (T4)" in d.reason
    assert "per GPU" in batching.table_text(d)


def test_describe_shows_the_table_the_probe_and_the_reason():
    from dataclasses import replace

    d = batching.decide_gpu([M(16, 3.0, 4.0), M(32, oom="training")], 16.0, 0.85, (16, 32), n_images=128,
                            baseline_gb=0.5, device_name="GPU 0 (T4)")
    d = replace(d, probe={"device": "GPU 0 (T4)", "seconds": 3.21, "safety_fraction": 0.85, "total_memory_gb": 16.0,
                          "baseline_gb": 0.5, "budget_gb": 13.1})
    lines = autobatch.describe(d).splitlines()
    assert lines[1].split() == ["*", "16", "3.00", "4.00", "4.00", "yes", "8", "4", "2", "64"]
    assert lines[2].split()[:6] == ["32", "-", "-", "-", "no", "4"] and lines[2].endswith("out of memory in training")
    assert lines[3] == "probe: 3.2 s on GPU 0 (T4), budget 85% of 16.0 GB minus 0.50 GB in use = 13.10 GB"
    assert lines[4].startswith("batch 16: batch 16 is the largest candidate")
    assert d.summary()["probe"]["seconds"] == 3.21


@pytest.mark.parametrize("m, expected", [
    (M(16, 9.0, 14.2), ["needs 14.20 GB", "training 9.00", "validation at batch 32 14.20", "allows 13.60 GB"]),
    (M(16, oom="training"), ["ran out of memory in training"]),
    (M(16, 5.0, oom="validation"), ["ran out of memory in validation (validation runs at batch 32)"]),
])
def test_nothing_fits_names_the_figures_and_what_to_change(m, expected):
    with pytest.raises(BatchError) as e:
        batching.decide_gpu([m], 16.0, 0.85, (16, 32, 64), 128, device_name="GPU 0 (Tesla T4)", imgsz=1280)
    text = str(e.value)
    assert text.startswith("no batch size fits on GPU 0 (Tesla T4): even the smallest candidate, 16,")
    for part in expected + ["a lower --imgsz than 1280", "a smaller --model", "--batch 8"]:
        assert part in text


@pytest.mark.parametrize("safety", [0, -0.1, 1.01, 2])
def test_safety_fraction_outside_0_1_is_refused(safety):
    with pytest.raises(UsageError, match="--batch-safety"):
        batching.decide_gpu([M(16, 1.0, 1.0)], 16.0, safety, (16,), 128)


@pytest.mark.parametrize("text, expected", [("16,32,64", (16, 32, 64)), ("64, 16,32,16", (16, 32, 64)),
                                            ("8", (8,)), ((32, 16), (16, 32))])
def test_parse_candidates(text, expected):
    assert config.parse_candidates(text) == expected


@pytest.mark.parametrize("text", ["", "a,b", "0,16", "-8", "16;32"])
def test_parse_candidates_refuses(text):
    with pytest.raises(UsageError, match="--batch-candidates"):
        config.parse_candidates(text)


@pytest.mark.parametrize("current, expected", [(64, 32), (32, 16), (16, None), (48, 32), (8, None), (100, 64)])
def test_step_down(current, expected):
    assert batching.step_down(current, (16, 32, 64)) == expected


# -- worst-case labels and image size for the probe -----------------------------------------------------------


@pytest.mark.parametrize("overrides, expected", [({}, (40, 10)), ({"mosaic": 0}, (10, 10)),
                                                 ({"mixup": 0.1}, (80, 10)), ({"mosaic": 0, "cutmix": 0.5}, (20, 10))])
def test_label_load(overrides, expected):
    assert autobatch.label_load(10, overrides) == expected


def test_label_load_never_zero():
    assert autobatch.label_load(0, {}) == (1, 1)


@pytest.mark.parametrize("imgsz, overrides, expected", [(640, {}, 640), (640, {"multi_scale": 0.5}, 960),
                                                        (100, {}, 128), (64, {"multi_scale": 0.25}, 96)])
def test_probe_imgsz(imgsz, overrides, expected):
    assert facts.largest_training_imgsz(imgsz, overrides) == expected


def test_densest_labels_counts_label_files_without_the_check(tiny_data):
    info = datasets.load(tiny_data)
    assert info.check is None
    counts = [len([ln for ln in datasets.label_path(Path(p)).read_text().splitlines() if ln.strip()])
              for split in ("train", "val") for p in info.splits[split]]
    assert autobatch.densest_labels(info) == max(counts) > 0


# -- out-of-memory errors and the probe's steps ---------------------------------------------------------------


def test_is_out_of_memory_matches_pytorch_errors_only():
    from detector.yolo import recording

    assert recording.is_out_of_memory(torch.OutOfMemoryError(REAL_OOM))
    assert recording.is_out_of_memory(RuntimeError("CUDA error: out of memory\nCUDA kernel errors might be ..."))
    assert recording.is_out_of_memory(RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling cublasCreate"))
    assert not recording.is_out_of_memory(RuntimeError("mat1 and mat2 shapes cannot be multiplied (4x3 and 4x3)"))
    assert not recording.is_out_of_memory(ValueError("out of memory"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU refusal; this machine has CUDA")
def test_probe_never_runs_without_cuda():
    from detector.yolo import probe

    with pytest.raises(UsageError, match="needs a CUDA device"):
        probe.probe_batch_memory("yolo11n.yaml", 3, 64, (16,))


def test_probe_steps_stop_at_the_first_candidate_that_runs_out(monkeypatch):
    """The probe's real steps (model, loss, backward, optimizer, validation at 2x) on CPU, with a fake 8-image GPU."""
    from detector.yolo import probe

    small_gpu(monkeypatch, above=8)
    out = probe._probe_candidates("yolo11n.yaml", 3, 64, (2, 4, 8, 16), torch.device("cpu"), 12, 3, True, None)
    # batch 8 trains (8 images) but validates 16: out of memory there; 16 is never tried
    assert [(m["batch"], m["oom"]) for m in out] == [(2, None), (4, None), (8, "validation")]


def test_probe_validates_in_ultralytics_rectangular_batches(monkeypatch):
    """Training steps on square mosaics; validation at 2x in the batch shape Ultralytics forms (16:9 at 64: 64 x 96)."""
    from detector.yolo import probe

    shapes = []
    real = probe._ProbeModel.batch

    def batch(self, n, shape, labels, half=False):
        shapes.append((n, tuple(shape)))
        return real(self, n, shape, labels, half)

    monkeypatch.setattr(probe._ProbeModel, "batch", batch)
    out = probe._probe_candidates("yolo11n.yaml", 3, 64, (2,), torch.device("cpu"), 4, 2, True, None,
                                  val_aspects=(9 / 16,) * 5)
    assert [m["oom"] for m in out] == [None]
    assert shapes == [(2, (64, 64)), (2, (64, 64)), (4, (64, 96))]


# -- detector batch ---------------------------------------------------------------------------------------------


def test_batch_command_on_cpu_shows_the_plan(tiny_data):
    result = CliRunner().invoke(main, ["batch", "--data", str(tiny_data), "--imgsz", "64"])
    assert result.exit_code == 0, result.output + repr(result.exception)
    out = result.output
    assert "40 training images" in out and "on CPU" in out
    table = [line.split() for line in out.splitlines() if line.strip().startswith(("*", "16", "32", "64"))]
    # marker, batch, train/val/peak GB, fits, it/epoch, accumulate, steps/epoch, img/step
    assert table == [["*", "16", "-", "-", "-", "-", "3", "4", "0.75", "64"],  # a step every 4 iterations
                     ["32", "-", "-", "-", "-", "2", "2", "1", "64"],
                     ["64", "-", "-", "-", "-", "1", "1", "1", "64"]]
    assert "batch 16: no CUDA device" in out
    words = " ".join(out.split())
    assert "ceil(40 / batch) iterations" in words and "round(64 / batch)" in words


def test_batch_command_entry_point_with_candidates_and_nbs(tiny_data, tmp_path):
    proc = run_cli(["batch", "--data", str(tiny_data), "--imgsz", "64", "--batch-candidates", "8,16", "nbs=16"],
                   tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr
    rows = [line.split() for line in proc.stdout.splitlines() if line.strip().startswith(("*", "8 ", "16"))]
    assert rows == [["8", "-", "-", "-", "-", "5", "2", "2.5", "16"],
                    ["*", "16", "-", "-", "-", "-", "3", "1", "3", "16"]]
    assert "nbs 16" in proc.stdout


@pytest.mark.parametrize("args, message", [(["--batch-candidates", "16,x"], "--batch-candidates"),
                                           (["--batch-safety", "1.5"], "--batch-safety")])
def test_batch_command_refuses_bad_options(tiny_data, args, message):
    result = CliRunner().invoke(main, ["batch", "--data", str(tiny_data), *args])
    assert result.exit_code == 2 and message in result.output


# -- out-of-memory during training ------------------------------------------------------------------------------


def _train(tiny_data, tmp_path, name, *args):
    return CliRunner().invoke(main, ["train", "--data", str(tiny_data), "--imgsz", "64", "--project",
                                     str(tmp_path), "--name", name, "plots=False", *args])


def _consistent(run: Path, epochs: int) -> list[dict]:
    rows = read_csv(run / "iterations.csv")
    assert [int(r["iteration"]) for r in rows] == list(range(1, len(rows) + 1))  # no repeats, no gaps
    assert [int(r["epoch"]) for r in read_csv(run / "epochs.csv")] == list(range(1, epochs + 1))
    for e in range(1, epochs + 1):
        mine = [int(r["epoch_iteration"]) for r in rows if int(r["epoch"]) == e]
        assert mine == list(range(1, len(mine) + 1)), f"epoch {e} has orphan rows"
    seen = [int(r["images_seen"]) for r in rows]
    assert seen == [sum(int(r["batch_size"]) for r in rows[:i + 1]) for i in range(len(rows))]
    return rows


def test_oom_in_a_later_epoch_steps_down_and_resumes(tiny_data, tmp_path, monkeypatch):

    # From epoch 2, iteration 2 on, the device holds only 8 training images (16 validating at 2x the batch);
    # Ultralytics halves only in the first epoch, so it re-raises there.
    small_gpu(monkeypatch, above=8, val_above=16, epoch=2, iteration=2)
    result = _train(tiny_data, tmp_path, "oom", "--epochs", "3", "--batch-candidates", "8,16,32")
    assert result.exit_code == 0, result.output + repr(result.exception)
    assert "out of memory at batch 16 (epoch 2 training, iteration 5); resuming" in result.output
    run = tmp_path / "oom"
    record = json.loads((run / "run.json").read_text())
    assert record["status"] == "completed"
    assert record["batch"]["chosen"] == 16 and record["batch"]["used"] == 8
    steps = [e for e in record["events"] if e["type"] == "oom_step_down"]
    assert len(steps) == 1
    assert {k: steps[0][k] for k in ("epoch", "iteration", "epoch_iteration", "phase", "from", "to")} == {
        "epoch": 2, "iteration": 5, "epoch_iteration": 2, "phase": "training", "from": 16, "to": 8}
    assert steps[0]["action"] == "resumed from weights/last.pt"
    rows = _consistent(run, 3)
    # epoch 1 at 16 (16+16+8); the aborted epoch-2 row at 16 is gone; epochs 2 and 3 at 8 (5 iterations each)
    assert [(int(r["epoch"]), int(r["batch_size"])) for r in rows] == [(1, 16), (1, 16), (1, 8)] + [(2, 8)] * 5 + [
        (3, 8)] * 5


def test_oom_in_first_validation_restarts_from_scratch(tiny_data, tmp_path, monkeypatch):

    # Training at 16 fits; validation runs at 32 and does not; no checkpoint exists yet.
    small_gpu(monkeypatch, above=16, epoch=1)
    result = _train(tiny_data, tmp_path, "val-oom", "--epochs", "1", "--batch-candidates", "8,16")
    assert result.exit_code == 0, result.output + repr(result.exception)
    run = tmp_path / "val-oom"
    record = json.loads((run / "run.json").read_text())
    step = next(e for e in record["events"] if e["type"] == "oom_step_down")
    assert (step["epoch"], step["phase"], step["from"], step["to"]) == (1, "validation", 16, 8)
    assert step["action"].startswith("restarted from scratch")
    rows = _consistent(run, 1)
    assert [int(r["batch_size"]) for r in rows] == [8] * 5 and record["batch"]["used"] == 8


def test_oom_with_no_smaller_candidate_fails_clearly(tiny_data, tmp_path, monkeypatch):

    small_gpu(monkeypatch, above=8, val_above=32, epoch=2)
    result = _train(tiny_data, tmp_path, "no-room", "--epochs", "2", "--batch-candidates", "16")
    assert result.exit_code == 1
    assert "out of memory at batch 16 (epoch 2 training, iteration 4) and no smaller candidate" in result.output
    assert "--resume" in result.output and "--batch 8" in result.output
    record = json.loads((tmp_path / "no-room" / "run.json").read_text())
    assert record["status"] == "failed" and "no smaller candidate" in record["error"]
    _consistent(tmp_path / "no-room", 1)  # the completed epoch stays; no partial-epoch row survives a resume
