"""Ctrl-C, SIGKILL and --resume on real training subprocesses of the installed entry point."""

from __future__ import annotations

import csv
import json
import signal
import subprocess
import time
from pathlib import Path

import pytest

from .conftest import detector_exe, guarded_env, run_cli

pytestmark = pytest.mark.slow
EPOCHS, PER_EPOCH = 12, 5  # 40 images at batch 8


def start_training(tiny_data: Path, project: Path, name: str, tmp_path: Path) -> subprocess.Popen:
    args = [detector_exe(), "train", "--data", str(tiny_data), "--epochs", str(EPOCHS), "--imgsz", "64",
            "--batch", "8", "--project", str(project), "--name", name, "plots=False", "val=False"]
    return subprocess.Popen(args, env=guarded_env(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)


def wait_for_epoch(run_dir: Path, epoch: int, proc: subprocess.Popen, timeout: float = 300) -> None:
    """Block until iterations.csv has a row of `epoch` (so epoch-1 is complete and saved)."""
    deadline = time.time() + timeout
    path = run_dir / "iterations.csv"
    while time.time() < deadline:
        assert proc.poll() is None, proc.communicate()
        if path.exists():
            rows = path.read_text().splitlines()[1:]
            if any(r.split(",")[0] == str(epoch) for r in rows):
                return
        time.sleep(0.05)
    raise AssertionError(f"no row of epoch {epoch} within {timeout} s")


def complete_rows(path: Path) -> list[dict]:
    """Parse a CSV and require every line to be a whole row."""
    text = path.read_text()
    assert text.endswith("\n"), "a row was cut short"
    rows = list(csv.DictReader(text.splitlines()))
    assert all(None not in r and None not in r.values() for r in rows)
    return rows


def assert_resumes_to_completion(run_dir: Path, tmp_path: Path) -> None:
    proc = run_cli(["train", "--resume", str(run_dir)], tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    run = json.loads((run_dir / "run.json").read_text())
    assert run["status"] == "completed" and "resumed" in [e["type"] for e in run["events"]]
    rows = complete_rows(run_dir / "iterations.csv")
    assert [int(r["iteration"]) for r in rows] == list(range(1, EPOCHS * PER_EPOCH + 1))  # none repeated or lost
    assert [int(r["epoch"]) for r in rows] == [e for e in range(1, EPOCHS + 1) for _ in range(PER_EPOCH)]
    steps = [int(r["optimizer_step"]) for r in rows]
    assert steps == sorted(steps)
    times = [float(r["time_s"]) for r in rows]
    assert times == sorted(times)  # time_s continues across the resume
    assert [int(r["epoch"]) for r in complete_rows(run_dir / "epochs.csv")] == list(range(1, EPOCHS + 1))


def assert_no_network(tmp_path: Path) -> None:
    """No connect or DNS lookup was attempted, and the user's own Ultralytics settings were not touched."""
    log = tmp_path / "netlog.txt"
    assert not log.exists() or log.read_text() == "", log.read_text()
    assert not (tmp_path / "xdg-config" / "Ultralytics").exists()


def test_ctrl_c_marks_interrupted_and_resume_appends(tiny_data, tmp_path):
    project = tmp_path / "runs"
    proc = start_training(tiny_data, project, "int", tmp_path)
    run_dir = project / "int"
    wait_for_epoch(run_dir, 3, proc)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("Error: training interrupted;")
    run = json.loads((run_dir / "run.json").read_text())
    assert run["status"] == "interrupted" and run["finished"]
    assert run["progress"]["epochs_completed"] >= 2
    assert (run_dir / "weights/last.pt").is_file()
    complete_rows(run_dir / "iterations.csv")
    complete_rows(run_dir / "epochs.csv")
    assert_resumes_to_completion(run_dir, tmp_path)
    assert_no_network(tmp_path)


def test_sigkill_leaves_parseable_files_and_resume_appends(tiny_data, tmp_path):
    project = tmp_path / "runs"
    proc = start_training(tiny_data, project, "kill", tmp_path)
    run_dir = project / "kill"
    wait_for_epoch(run_dir, 3, proc)
    time.sleep(0.3)  # land somewhere inside epoch 3
    proc.kill()
    proc.communicate(timeout=60)
    run = json.loads((run_dir / "run.json").read_text())  # still parseable, says how far it got
    assert run["status"] == "running" and run["progress"]["epochs_completed"] >= 2
    from detector.record import runs

    assert any("killed without a trace" in note for note in runs.load(run_dir).notes)  # a reader can tell
    rows = complete_rows(run_dir / "iterations.csv")
    assert [int(r["iteration"]) for r in rows] == list(range(1, len(rows) + 1))
    complete_rows(run_dir / "epochs.csv")
    assert_resumes_to_completion(run_dir, tmp_path)
    assert_no_network(tmp_path)
