"""`detector train` and the run-directory contract, on real tiny CPU trainings."""

from __future__ import annotations

import csv
import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import yaml
from click.testing import CliRunner

from detector.data import datasets
from detector.data import synth
from detector.cli import main
from detector.record.writer import Recorder, epoch_columns, iteration_columns

from .conftest import run_cli

LOSSES = ["box_loss", "cls_loss", "dfl_loss"]


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def expected_optimizer_steps(iterations_per_epoch: int, epochs: int, batch: int, nbs: int, warmup_epochs: float):
    """Ultralytics 8.4's stepping rule (trainer._do_train), replayed: cumulative steps after each iteration."""
    acc0 = max(round(nbs / batch), 1)
    acc0 = min(acc0, iterations_per_epoch * epochs)
    nw = round(min(warmup_epochs, max(epochs - 1, 0)) * iterations_per_epoch)
    last, steps, out = -1, 0, []
    for ni in range(iterations_per_epoch * epochs):
        acc = max(1, int(np.interp(ni, [0, nw], [1, acc0]).round())) if nw and ni <= nw else acc0
        if ni - last >= acc:
            steps, last = steps + 1, ni
        out.append(steps)
    return out


# -- the record of a real training ------------------------------------------------------------------


def test_run_folder_has_every_file(tiny_run):
    for name in ("run.json", "iterations.csv", "epochs.csv", "results.csv", "data.yaml", "weights/best.pt",
                 "weights/last.pt"):
        assert (tiny_run / name).is_file(), name


def test_iteration_rows_follow_batch_arithmetic(tiny_run):
    rows = read_csv(tiny_run / "iterations.csv")
    assert list(rows[0]) == iteration_columns(LOSSES)
    per_epoch = math.ceil(40 / 16)
    assert len(rows) == 2 * per_epoch
    assert [int(r["iteration"]) for r in rows] == list(range(1, 7))
    assert [int(r["epoch"]) for r in rows] == [1, 1, 1, 2, 2, 2]
    assert [int(r["epoch_iteration"]) for r in rows] == [1, 2, 3] * 2
    assert [int(r["batch_size"]) for r in rows] == [16, 16, 8] * 2  # the last batch holds the remainder
    assert [int(r["images_seen"]) for r in rows] == [16, 32, 40, 56, 72, 80]
    for r in rows:
        assert float(r["loss"]) == pytest.approx(sum(float(r[k]) for k in LOSSES), rel=1e-4)
        assert r["gpu_mem_gb"] == ""  # CPU
    times = [float(r["time_s"]) for r in rows]
    assert times == sorted(times) and times[0] > 0


def test_optimizer_steps_follow_accumulation(tiny_run):
    run = json.loads((tiny_run / "run.json").read_text())
    assert run["nbs"] == 64 and run["accumulate"] == 4  # round(64 / 16)
    rows = read_csv(tiny_run / "iterations.csv")
    expected = expected_optimizer_steps(3, 2, 16, 64, warmup_epochs=3.0)
    assert [int(r["optimizer_step"]) for r in rows] == expected


def test_epochs_csv_matches_ultralytics_results(tiny_run):
    ours = read_csv(tiny_run / "epochs.csv")
    theirs = read_csv(tiny_run / "results.csv")
    assert list(ours[0]) == epoch_columns(LOSSES)
    assert len(ours) == len(theirs) == 2  # the final validation on best.pt is not an epoch row
    pairs = {"precision": "metrics/precision(B)", "recall": "metrics/recall(B)", "map50": "metrics/mAP50(B)",
             "map50_95": "metrics/mAP50-95(B)", "val_box_loss": "val/box_loss", "train_cls_loss": "train/cls_loss"}
    for a, b in zip(ours, theirs):
        assert int(a["epoch"]) == int(b["epoch"])
        for mine, ul in pairs.items():
            assert float(a[mine]) == pytest.approx(float(b[ul]), rel=1e-5, abs=1e-9), (mine, a[mine], b[ul])
        assert float(a["images_per_s"]) > 0 and float(a["epoch_time_s"]) > 0


def test_run_json_contract(tiny_run, tiny_data):
    run = json.loads((tiny_run / "run.json").read_text())
    assert run["name"] == "tiny" and run["status"] == "completed"
    assert run["started"].endswith("+00:00") and run["finished"] >= run["started"]
    assert run["command"][:2] == ["detector", "train"]
    assert run["config"]["epochs"] == 2 and run["config"]["ultralytics"]["plots"] is False
    ds = run["dataset"]
    assert (ds["train_images"], ds["val_images"]) == (40, 16)
    assert ds["names"] == {str(i): n for i, n in enumerate(synth.CLASSES)} and len(ds["fingerprint"]) == 16
    assert run["model"] == "yolo11n.yaml"
    assert run["device"]["name"] == "cpu"
    batch = run["batch"]
    assert (batch["requested"], batch["chosen"], batch["used"]) == ("16", 16, 16) and batch["reason"]
    assert batch["table"][0]["iterations_per_epoch"] == 3
    assert run["optimizer"] in {"AdamW", "SGD"} and run["lr0"] > 0
    assert set(run["versions"]) == {"python", "torch", "ultralytics", "albumentations", "detector"}
    assert run["events"] == []
    assert run["progress"]["epochs_completed"] == 2 and run["progress"]["iterations_completed"] == 6
    assert 0 <= run["final"]["map50"] <= 1 and run["final"]["weights"].endswith("best.pt")


def test_resolved_data_yaml_is_absolute_and_offline(tiny_run):
    data = yaml.safe_load((tiny_run / "data.yaml").read_text())
    assert Path(data["path"]).is_absolute() and Path(data["train"]).is_absolute()
    assert "download" not in data


# -- the built-in dataset ---------------------------------------------------------------------------


def test_builtin_dataset_is_deterministic(tmp_path):
    spec = synth.SynthSpec(train_images=6, val_images=2, imgsz=64, seed=5)
    a = synth.generate(spec, tmp_path / "a").parent
    b = synth.generate(spec, tmp_path / "b").parent
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file() and p.name != "data.yaml")
    assert len(files) == 16
    assert all((a / f).read_bytes() == (b / f).read_bytes() for f in files)
    other = synth.generate(synth.SynthSpec(train_images=6, val_images=2, imgsz=64, seed=6), tmp_path / "c").parent
    assert (a / "images/train/train_00000.png").read_bytes() != (other / "images/train/train_00000.png").read_bytes()


def test_builtin_dataset_has_varied_valid_labels(tmp_path):
    spec = synth.SynthSpec(train_images=60, val_images=0, imgsz=96, seed=1)
    root = synth.generate(spec, tmp_path / "d").parent
    lines = [line.split() for f in (root / "labels/train").glob("*.txt") for line in f.read_text().splitlines()]
    classes = {int(p[0]) for p in lines}
    assert classes == set(range(len(synth.CLASSES)))
    coords = np.array([[float(v) for v in p[1:]] for p in lines])
    assert coords.min() >= 0 and coords.max() <= 1
    assert coords[:, 2].std() > 0.03  # sizes vary


def test_builtin_dataset_is_cached(tmp_path):
    spec = synth.SynthSpec(train_images=3, val_images=1, imgsz=64)
    first = synth.ensure(spec, tmp_path)
    stamp = first.stat().st_mtime_ns
    assert synth.ensure(spec, tmp_path) == first and first.stat().st_mtime_ns == stamp


# -- data YAML resolution ------------------------------------------------------------------------------


def test_relative_path_is_resolved_against_the_yaml(tmp_path, tiny_data, monkeypatch):
    cfg = tmp_path / "configs"
    cfg.mkdir()
    rel = os.path.relpath(tiny_data.parent, cfg)
    (cfg / "d.yaml").write_text(f"path: {rel}\ntrain: images/train\nval: images/val\nnames: [a, b, c, d]\n"
                                "download: https://example.com/never.zip\n")
    monkeypatch.chdir(tmp_path.parent)  # somewhere else entirely
    info = datasets.load(cfg / "d.yaml")
    assert info.root == tiny_data.parent.resolve() and info.train_images == 40
    resolved = info.resolved_yaml()
    assert "download" not in resolved and Path(resolved["val"]).is_dir()


def test_coco128_trains_from_its_relative_path(coco128_yaml, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # coco128.yaml says path: . meaning its own folder
    before = sorted(p.relative_to(coco128_yaml.parent) for p in coco128_yaml.parent.rglob("*"))
    result = CliRunner().invoke(main, ["train", "--data", str(coco128_yaml), "--epochs", "1", "--imgsz", "64",
                                       "--batch", "32", "--project", str(tmp_path / "runs"), "--name", "c",
                                       "plots=False", "val=False"])
    assert result.exit_code == 0, result.output
    # Ultralytics' label cache (labels/train2017.cache) goes to the tool's folder, never into the dataset
    assert sorted(p.relative_to(coco128_yaml.parent) for p in coco128_yaml.parent.rglob("*")) == before
    run = json.loads((tmp_path / "runs/c/run.json").read_text())
    assert run["dataset"]["train_images"] == 128 and len(run["dataset"]["names"]) == 80
    assert len(read_csv(tmp_path / "runs/c/iterations.csv")) == 4
    epochs = read_csv(tmp_path / "runs/c/epochs.csv")
    assert len(epochs) == 1 and epochs[0]["map50"] != ""  # the last epoch is always validated


# -- the recorder on its own --------------------------------------------------------------------------


def test_recorder_drops_cut_rows_and_later_epochs(tmp_path):
    rec = Recorder(tmp_path)
    rec.start({"name": "r"})
    for i in range(1, 7):
        rec.iteration(LOSSES, {"epoch": (i + 1) // 2, "iteration": i, "loss": 1.0, "time_s": "1.0"})
    rec.close()
    with open(tmp_path / "iterations.csv", "a") as f:
        f.write("3,7,1,16")  # a row cut short by SIGKILL
    last = rec.keep_epochs_through(2)
    rows = read_csv(tmp_path / "iterations.csv")
    assert [int(r["iteration"]) for r in rows] == [1, 2, 3, 4] and last["iteration"] == "4"
    assert not list(tmp_path.glob(".*tmp"))
    rec.finish("interrupted")
    assert json.loads((tmp_path / "run.json").read_text())["status"] == "interrupted"


# -- first-epoch out-of-memory halving (Ultralytics' own), with the hardware faked ---------------------


def test_first_epoch_oom_halving_keeps_the_record_consistent(tmp_path, tiny_data):
    import torch

    from detector.yolo import recording

    class OomOnceTrainer(recording.RecordingTrainer):
        """Fails like a full GPU once, at the second batch of 16, with PyTorch's real message."""

        failed = False

        def preprocess_batch(self, batch):
            batch = super().preprocess_batch(batch)
            if not OomOnceTrainer.failed and self.progress.iteration == 1 and batch["img"].shape[0] == 16:
                OomOnceTrainer.failed = True
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 MiB (GPU 0; 7.79 GiB "
                                             "total capacity; 6.10 GiB already allocated; 9.94 MiB free)")
            return batch

    run_dir = tmp_path / "oom"
    run_dir.mkdir()
    Recorder(run_dir).start({"name": "oom", "batch": {"requested": "16", "chosen": 16}})
    args = {"data": str(tiny_data), "model": "yolo11n.yaml", "epochs": 2, "imgsz": 64, "batch": 16, "workers": 0,
            "project": str(tmp_path), "name": "oom", "exist_ok": True, "plots": False, "val": False}
    outcome = recording.train(args, Recorder(run_dir), trainer_cls=OomOnceTrainer)
    assert outcome["batch_used"] == 8
    run = json.loads((run_dir / "run.json").read_text())
    (event,) = run["events"]
    assert (event["type"], event["from"], event["to"], event["epoch"], event["iteration"]) == (
        "oom_step_down", 16, 8, 1, 2)
    assert run["batch"]["used"] == 8
    rows = read_csv(run_dir / "iterations.csv")
    assert [int(r["iteration"]) for r in rows] == list(range(1, 11))  # 2 epochs x ceil(40/8), no orphans
    assert {int(r["batch_size"]) for r in rows} == {8}
    assert [int(r["images_seen"]) for r in rows][-1] == 80


# -- bad input: one line, non-zero exit, nothing overwritten -----------------------------------------


def _fails(args, expect: str):
    result = CliRunner().invoke(main, ["train", *args])
    assert result.exit_code != 0, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert lines[-1].startswith("Error: ") and expect in lines[-1], result.output
    return result


@pytest.fixture
def empty_split_yaml(tmp_path):
    (tmp_path / "images/train").mkdir(parents=True)
    (tmp_path / "images/val").mkdir(parents=True)
    y = tmp_path / "empty.yaml"
    y.write_text("path: .\ntrain: images/train\nval: images/val\nnames: [a]\n")
    return y


def test_bad_inputs_are_refused_clearly(tmp_path, tiny_data, empty_split_yaml):
    project = tmp_path / "p"
    base = ["--project", str(project), "--data", str(tiny_data)]
    _fails(["--data", str(tmp_path / "nope.yaml"), "--project", str(project)], "not found")
    novals = tmp_path / "noval.yaml"
    novals.write_text("train: images/train\nnames: [a]\n")
    _fails(["--data", str(novals), "--project", str(project)], "val")
    _fails(["--data", str(empty_split_yaml), "--project", str(project)], "no images")
    _fails([*base, "--model", "yolo99z.yaml"], "nothing can be downloaded")
    _fails([*base, "--model", "yolo11n.pt"], "--download")  # not in the (empty) weights cache: say how to fetch it
    _fails([*base, "--model", "yolo11n-seg.yaml"], "detection")
    damaged = tmp_path / "damaged.pt"
    damaged.write_bytes(b"\x80\x02not a checkpoint")
    _fails([*base, "--model", str(damaged)], "cannot load")
    for bad in ("abc", "0", "-4", "1.5"):
        _fails([*base, "--batch", bad], "--batch")
    _fails([*base, "--epochs", "0"], "--epochs")
    _fails([*base, "--imgsz", "8"], "--imgsz")
    _fails([*base, "lr00=0.1"], "unknown training argument 'lr00'")
    _fails([*base, "epochs=3"], "--epochs")
    _fails([*base, "oops"], "key=value")
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    _fails(["--data", str(tiny_data), "--project", str(blocker / "runs")], "project folder")
    assert not project.exists()  # nothing was created by any refused command


def test_existing_run_is_never_overwritten(tiny_run, tiny_data):
    before = (tiny_run / "run.json").read_bytes(), (tiny_run / "iterations.csv").read_bytes()
    _fails(["--data", str(tiny_data), "--project", str(tiny_run.parent), "--name", "tiny"], "already exists")
    assert ((tiny_run / "run.json").read_bytes(), (tiny_run / "iterations.csv").read_bytes()) == before


def test_resume_refuses_completed_and_non_runs(tiny_run, tmp_path):
    _fails(["--resume", str(tiny_run)], "already completed")
    _fails(["--resume", str(tmp_path)], "not a detector run")


def test_installed_entry_point_reports_errors_in_one_line(tmp_path):
    proc = run_cli(["train", "--data", str(tmp_path / "missing.yaml"), "--project", str(tmp_path / "p")], tmp_path)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [f"Error: data file {tmp_path / 'missing.yaml'} not found; "
                                                "pass --data with a YOLO data YAML"]
    proc = run_cli(["train", "--batch", "many"], tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and "--batch" in proc.stderr


def test_python_dash_m_runs_the_cli():
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "detector", "--version"], capture_output=True, text=True)
    assert proc.returncode == 0 and "detector" in proc.stdout


def test_only_rank_zero_records(tmp_path, tiny_data, monkeypatch):
    """Under DDP every rank runs the trainer; a process that is not rank 0 trains but writes no record."""
    from detector.yolo import recording

    monkeypatch.setattr(recording, "RANK", 1)  # what this process would see as a second DDP worker
    args = {"data": str(tiny_data), "model": "yolo11n.yaml", "epochs": 1, "imgsz": 64, "batch": 16, "workers": 0,
            "project": str(tmp_path), "name": "r1", "exist_ok": True, "plots": False}
    outcome = recording.train(args, Recorder(tmp_path / "r1"))
    assert outcome["batch_used"] == 16 and (tmp_path / "r1/weights/last.pt").is_file()  # it did train
    assert not (tmp_path / "r1/iterations.csv").exists() and not (tmp_path / "r1/epochs.csv").exists()
    assert not (tmp_path / "r1/run.json").exists()


def test_resume_refuses_options_it_cannot_honour(tiny_run, tmp_path):
    import shutil

    copy = shutil.copytree(tiny_run, tmp_path / "stopped")
    run = json.loads((copy / "run.json").read_text())
    (copy / "run.json").write_text(json.dumps({**run, "status": "interrupted"}))
    _fails(["--resume", str(copy), "--epochs", "5"], "--epochs cannot change a resumed run")
    _fails(["--resume", str(copy), "lr0=0.1"], "KEY=VALUE cannot change a resumed run")
    assert json.loads((copy / "run.json").read_text())["status"] == "interrupted"  # nothing was touched


def test_txt_image_lists_are_resolved_against_their_folder(tmp_path, tiny_data, monkeypatch):
    """A split given as a .txt of relative lines trains on the files the user meant, from any directory."""
    import shutil

    root = shutil.copytree(tiny_data.parent, tmp_path / "copy")
    (root / "train-list.txt").write_text("".join(f"images/train/train_{i:05d}.png\n" for i in range(20)))
    y = tmp_path / "list.yaml"
    y.write_text(f"path: {root}\ntrain: train-list.txt\nval: images/val\nnames: [a, b, c, d]\n")
    info = datasets.load(y)
    assert info.train_images == 20
    monkeypatch.chdir(tmp_path)
    resolved = yaml.safe_load(info.write_resolved(tmp_path / "data.yaml").read_text())
    lines = Path(resolved["train"]).read_text().splitlines()
    assert len(lines) == 20 and all(Path(p).is_absolute() and Path(p).is_file() for p in lines)
