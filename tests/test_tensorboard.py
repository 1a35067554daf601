"""TensorBoard event files: read back with TensorBoard's own EventAccumulator and
compared, value by value, with iterations.csv and epochs.csv."""

from __future__ import annotations

import csv
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from detector.cli import main

pytest.importorskip("tensorboard")
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402
from tensorboard.plugins.hparams import metadata as hp_metadata  # noqa: E402


def _rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _accumulator(run_dir: Path) -> EventAccumulator:
    files = list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    assert len(files) == 1, files  # rewritten, never appended to
    acc = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return acc


def _expected_tag(table: str, column: str) -> str:
    if table == "iteration":
        return f"iteration/{column}"
    if column in {"precision", "recall", "map50", "map50_95"}:
        return f"metrics/{column}"
    for prefix in ("val_", "train_"):
        if column.startswith(prefix):
            return f"{prefix[:-1]}/{column[len(prefix):]}"
    return f"epoch/{column}"


def assert_events_match_csvs(run_dir: Path) -> int:
    """Every non-empty CSV cell is one scalar at the row's step with the same (float32) value; nothing else."""
    acc = _accumulator(run_dir)
    compared = 0
    for table, file, step_col, index in (("iteration", "iterations.csv", "iteration", {"epoch", "iteration",
                                                                                       "epoch_iteration"}),
                                         ("epoch", "epochs.csv", "epoch", {"epoch"})):
        rows = _rows(run_dir / file)
        assert rows
        for column in rows[0]:
            if column in index:
                continue
            want = {int(r[step_col]): np.float32(float(r[column])) for r in rows if r[column] != ""}
            tag = _expected_tag(table, column)
            if not want:
                assert tag not in acc.Tags()["scalars"], f"{tag} has no values in {file} but was written"
                continue
            got = {e.step: np.float32(e.value) for e in acc.Scalars(tag)}
            assert got == want, f"{tag}: events {got} != {file} {want}"
            compared += len(want)
    return compared


def _hparams(run_dir: Path) -> dict:
    acc = _accumulator(run_dir)
    meta = acc.SummaryMetadata(hp_metadata.SESSION_START_INFO_TAG)
    info = hp_metadata.parse_session_start_info_plugin_data(meta.plugin_data.content)
    out = {}
    for key, value in info.hparams.items():
        out[key] = getattr(value, value.WhichOneof("kind"))
    return out


@pytest.fixture
def run_copy(tiny_run, tmp_path) -> Path:
    """The shared tiny run's records (no weights), copied so its folder stays as other tests expect."""
    copy = tmp_path / "runs" / "tiny"
    shutil.copytree(tiny_run, copy, ignore=shutil.ignore_patterns("weights", "tensorboard"))
    return copy


def _ensure_column(path: Path, name: str, values: list[str]) -> None:
    """Give the CSV a column `name` with these values unless it already holds some."""
    rows = _rows(path)
    if any(r.get(name) for r in rows):
        return
    columns = list(rows[0]) + ([name] if name not in rows[0] else [])
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, columns, lineterminator="\n")
        writer.writeheader()
        for row, v in zip(rows, values):
            writer.writerow({**row, name: v})


def test_command_writes_every_csv_value_and_the_config(run_copy):
    # Columns other parts record when asked (gradient norm, noise scale) follow without a change; an empty
    # cell (not recorded that iteration) writes nothing.
    # (Where the trainer recorded them already, the recorded values are checked instead.)
    n_iter = len(_rows(run_copy / "iterations.csv"))
    _ensure_column(run_copy / "iterations.csv", "grad_norm", [f"{1.5 + i:.6g}" for i in range(n_iter - 1)] + [""])
    _ensure_column(run_copy / "epochs.csv", "grad_noise_scale", ["", "123.457"])
    for _ in range(2):  # a second conversion replaces the first
        result = CliRunner().invoke(main, ["tensorboard", str(run_copy)])
        assert result.exit_code == 0, result.output
    assert "2 epochs" in result.output
    compared = assert_events_match_csvs(run_copy)
    assert compared > 60
    acc = _accumulator(run_copy)
    norms = [int(r["iteration"]) for r in _rows(run_copy / "iterations.csv") if r["grad_norm"]]
    assert norms and [e.step for e in acc.Scalars("iteration/grad_norm")] == norms
    noise = [int(r["epoch"]) for r in _rows(run_copy / "epochs.csv") if r["grad_noise_scale"]]
    assert noise and [e.step for e in acc.Scalars("epoch/grad_noise_scale")] == noise
    hp = _hparams(run_copy)
    assert hp["epochs"] == 2 and hp["imgsz"] == 64 and hp["batch_used"] == 16 and hp["plots"] is False
    assert hp["optimizer"] and hp["lr0"] > 0 and hp["model"] == "yolo11n.yaml"
    assert not list(run_copy.glob(".tensorboard*"))  # no temporary folder left behind


def test_command_checks_every_run_before_writing(run_copy, tmp_path):
    result = CliRunner().invoke(main, ["tensorboard", str(run_copy), str(tmp_path / "missing")])
    assert result.exit_code != 0
    assert result.output.count("\n") == 1 and "missing" in result.output
    assert not (run_copy / "tensorboard").exists()


def test_train_with_tensorboard_flag(tiny_data, tmp_path):
    project = tmp_path / "runs"
    result = CliRunner().invoke(main, ["train", "--data", str(tiny_data), "--epochs", "1", "--imgsz", "64",
                                       "--batch", "16", "--project", str(project), "--name", "tb",
                                       "--tensorboard", "plots=False", "val=True"])
    assert result.exit_code == 0, result.output + repr(result.exception)
    assert "tensorboard --logdir" in result.output
    assert assert_events_match_csvs(project / "tb") > 30
    assert _hparams(project / "tb")["tensorboard"] is True


def test_train_tensorboard_refused_without_the_package(tiny_data, tmp_path, monkeypatch):
    # None in sys.modules makes the import fail as if the package were not installed.
    monkeypatch.setitem(sys.modules, "tensorboard.summary.writer.event_file_writer", None)
    result = CliRunner().invoke(main, ["train", "--data", str(tiny_data), "--epochs", "1", "--imgsz", "64",
                                       "--project", str(tmp_path / "runs"), "--name", "x", "--tensorboard"])
    assert result.exit_code == 2, result.output
    assert "detector[tensorboard]" in result.output and result.output.count("\n") == 1
    assert not (tmp_path / "runs").exists()


def test_live_writer_streams_the_cells_the_recorder_writes(tmp_path):
    # What TensorBoard shows while training: the same cells, as the recorder writes them.
    from detector.record import tensorboard
    from detector.record.writer import Recorder

    run_dir = tmp_path / "live"
    run_dir.mkdir()
    rec = Recorder(run_dir)
    rec.start({"name": "live", "config": {"epochs": 2, "lr0": 0.01}})
    stream = tensorboard.live(rec, run_dir)
    losses = ["box_loss", "cls_loss"]
    for i in range(1, 5):
        rec.iteration(losses, {"epoch": (i + 1) // 2, "iteration": i, "epoch_iteration": 2 - i % 2, "batch_size": 16,
                               "images_seen": 16 * i, "optimizer_step": i, "box_loss": 1 / i, "cls_loss": 2 / i,
                               "loss": 3 / i, "lr": 0.001 * i, "time_s": "%.3f" % (0.1 * i), "gpu_mem_gb": None})
        if i % 2 == 0:
            rec.epoch(losses, {"epoch": i // 2, "map50": 0.1 * i, "map50_95": 0.05 * i, "precision": 0.3,
                               "recall": None, "images_per_s": 123.456789})
    stream.close()
    rec.close()
    assert assert_events_match_csvs(run_dir) > 30
    assert _hparams(run_dir)["lr0"] == pytest.approx(0.01)
