"""Lose nothing and overwrite nothing under faults.

The faults are injected from here: tests/faultchild.py kills a real training
subprocess at a chosen phase (SIGKILL or Ctrl-C), monkeypatch makes the disk
full, and a child process holds a run's lock. Every case of the issue has a test
named after it (see the closing note of the issue).
"""

from __future__ import annotations

import csv
import errno
import hashlib
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from detector.cli import main

from .conftest import guarded_env

ROOT = Path(__file__).resolve().parents[1]
CHILD = Path(__file__).parent / "faultchild.py"
EPOCHS, BATCH, TRAIN_IMAGES = 3, 16, 40  # tiny_data: 40 training images -> 3 iterations per epoch
PER_EPOCH = math.ceil(TRAIN_IMAGES / BATCH)


def invoke(args: list[str]):
    return CliRunner().invoke(main, [str(a) for a in args])


def one_line_error(result, code: int = 1) -> str:
    """The single 'Error: ...' line of a refused command (no traceback)."""
    assert result.exit_code == code, (result.exit_code, result.output, result.exception)
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.output
    lines = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(lines) == 1, result.output
    return lines[0]


def child(phase: str, mode: str, args: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(CHILD), phase, mode, "--", *map(str, args)]
    return subprocess.run(cmd, env=guarded_env(tmp_path), capture_output=True, text=True, timeout=300, cwd=tmp_path)


def tree_digest(folder: Path) -> dict:
    return {str(p.relative_to(folder)): hashlib.sha1(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def complete_rows(path: Path) -> list[dict]:
    if not path.exists():
        return []
    text = path.read_text()
    assert text == "" or text.endswith("\n"), f"{path.name}: a row was cut short"
    rows = list(csv.DictReader(text.splitlines()))
    assert all(None not in r and None not in r.values() for r in rows), path.name
    return rows


def checkpoint_epoch(run_dir: Path) -> int:
    """Epochs last.pt holds (0 without one; all of them once Ultralytics stripped it)."""
    from detector.yolo import checkpoints

    last = run_dir / "weights" / "last.pt"
    if not last.exists():
        return 0
    ckpt = checkpoints.read_checkpoint(last)
    assert ckpt is not None, "last.pt is torn"
    return EPOCHS if ckpt["epoch"] == -1 else ckpt["epoch"] + 1


def assert_truthful(run_dir: Path) -> None:
    """After a kill: every file parses, and epochs.csv, last.pt and run.json's progress agree.

    The guaranteed order is row, then checkpoint, then progress, so epochs.csv may be
    one epoch ahead of last.pt (a resume trains that epoch again) and run.json's
    progress one behind; never the other way round.
    """
    run = json.loads((run_dir / "run.json").read_text())
    assert run["status"] in {"running", "interrupted"} and run["pid"]
    iterations = complete_rows(run_dir / "iterations.csv")
    assert [int(r["iteration"]) for r in iterations] == list(range(1, len(iterations) + 1))
    epochs = [int(r["epoch"]) for r in complete_rows(run_dir / "epochs.csv")]
    assert epochs == list(range(1, len(epochs) + 1))
    saved = checkpoint_epoch(run_dir)
    assert saved <= len(epochs) <= saved + 1, (saved, epochs)
    done = (run.get("progress") or {}).get("epochs_completed", 0)
    assert saved - 1 <= done <= saved, (done, saved)
    assert all(int(r["epoch"]) <= len(epochs) + 1 for r in iterations)


@pytest.fixture(scope="module")
def faulted(tiny_data, tmp_path_factory):
    """One run killed at every phase in turn, each time resumed; and a neighbour run that must not change."""
    tmp = tmp_path_factory.mktemp("faults")
    project = tmp / "runs"
    other = project / "other"
    (other / "weights").mkdir(parents=True)
    (other / "run.json").write_text(json.dumps({"name": "other", "status": "completed"}))
    (other / "weights" / "last.pt").write_bytes(b"other run's weights")
    before = tree_digest(other)
    new = ["train", "--data", tiny_data, "--epochs", EPOCHS, "--imgsz", 33, "--batch", BATCH,
           "--project", project, "plots=False"]
    out = {"project": project, "tmp": tmp, "log": {}}

    out["log"]["check"] = child("check", "kill", [*new, "--name", "chk"], tmp)
    out["log"]["first_iteration"] = child("first_iteration", "int", [*new, "--name", "first"], tmp)
    run_dir = project / "chain"
    resume = ["train", "--resume", run_dir]
    steps = [("after_checkpoint:1", "kill", [*new, "--name", "chain"]),  # issue case 7
             ("mid_epoch:2", "kill", resume),
             ("checkpoint_write:1", "kill", resume),  # inside the write of epoch 2's last.pt (case 3)
             ("validation:3", "kill", resume),
             ("final", "int", resume)]  # case 2: Ctrl-C after last.pt and best.pt were stripped
    out["states"] = []
    for phase, mode, args in steps:
        proc = child(phase, mode, args, tmp)
        out["log"][f"{phase}/{mode}"] = proc
        assert proc.returncode == (-9 if mode == "kill" else 130), (phase, proc.stderr[-3000:])
        assert_truthful(run_dir)
        out["states"].append({"phase": phase, "hidden": sorted(p.name for p in (run_dir / "weights").glob(".*")),
                              "epochs": len(complete_rows(run_dir / "epochs.csv")),
                              "saved": checkpoint_epoch(run_dir)})
    out["final_resume"] = invoke(resume)
    out["other_before"], out["other_after"] = before, tree_digest(other)
    out["run_dir"] = run_dir
    return out


def test_kill_at_every_phase_then_resume_completes(faulted):
    run_dir = faulted["run_dir"]
    assert faulted["final_resume"].exit_code == 0, faulted["final_resume"].output[-3000:]
    run = json.loads((run_dir / "run.json").read_text())
    assert run["status"] == "completed" and run["final"]["weights"].endswith("best.pt")
    assert run["progress"]["epochs_completed"] == EPOCHS
    iterations = complete_rows(run_dir / "iterations.csv")
    assert [int(r["iteration"]) for r in iterations] == list(range(1, EPOCHS * PER_EPOCH + 1))
    assert [int(r["epoch"]) for r in iterations] == [e for e in range(1, EPOCHS + 1) for _ in range(PER_EPOCH)]
    assert [int(r["epoch"]) for r in complete_rows(run_dir / "epochs.csv")] == list(range(1, EPOCHS + 1))
    assert run["progress"]["iterations_completed"] == EPOCHS * PER_EPOCH
    assert not list((run_dir / "weights").glob(".*.tmp"))  # the torn temporary file was cleared
    assert faulted["other_after"] == faulted["other_before"]  # nothing of another run changed
    netlog = faulted["tmp"] / "netlog.txt"
    assert not netlog.exists() or netlog.read_text() == ""


def test_kill_during_dataset_check_creates_nothing(faulted):
    assert faulted["log"]["check"].returncode == -9
    assert not (faulted["project"] / "chk").exists()


def test_interrupt_before_first_epoch_says_start_over(faulted):  # case 12
    first, proc = faulted["project"] / "first", faulted["log"]["first_iteration"]
    assert proc.returncode == 130 and "start a new run" in proc.stderr.strip().splitlines()[-1]
    run = json.loads((first / "run.json").read_text())
    assert run["status"] == "interrupted" and not (first / "weights" / "last.pt").exists()
    line = one_line_error(invoke(["train", "--resume", first]))
    assert "nothing to resume" in line and "start a new run" in line


def test_sigkill_after_last_pt_keeps_the_epoch_row(faulted):  # case 7
    state = faulted["states"][0]
    assert state["phase"] == "after_checkpoint:1"
    assert state["saved"] == 1 and state["epochs"] == 1  # the checkpointed epoch has its row


def test_kill_inside_checkpoint_write_leaves_old_checkpoint(faulted):  # case 3
    state = faulted["states"][2]
    assert state["phase"] == "checkpoint_write:1"
    assert any(n.startswith(".last.pt.") and n.endswith(".tmp") for n in state["hidden"]), state["hidden"]
    assert state["saved"] == 1 and state["epochs"] == 2  # epoch 1's last.pt whole; epoch 2's row is redone


def test_interrupt_in_final_validation_resumes_to_completed(faulted):  # case 2
    proc = faulted["log"]["final/int"]
    assert proc.returncode == 130 and "Traceback" not in proc.stderr
    assert f"continue with --resume {faulted['run_dir']}" in proc.stderr.strip().splitlines()[-1]
    assert "every epoch ended" in faulted["final_resume"].output


def test_imgsz_records_what_trains(faulted):  # case 11
    run = json.loads((faulted["run_dir"] / "run.json").read_text())
    assert run["config"]["imgsz"] == 64 and run["config"]["imgsz_requested"] == 33
    assert run["config"]["ultralytics"]["imgsz"] == 64
    assert "--imgsz 33 is not a multiple of the model's stride 32: training at 64" in \
        faulted["log"]["after_checkpoint:1/kill"].stdout


# ---- case 1: cfg=FILE --------------------------------------------------------------------------------


def test_cfg_file_cannot_choose_the_folder(tiny_data, tmp_path):
    project = tmp_path / "runs"
    base = project / "base"
    base.mkdir(parents=True)
    (base / "run.json").write_text(json.dumps({"status": "completed"}))
    for bad in ({"save_dir": str(base)}, {"resume": str(base / "weights" / "last.pt")}, {"project": str(project)},
                {"name": "base", "lr0": 0.01}):
        cfg = tmp_path / "args.yaml"
        cfg.write_text(yaml.safe_dump({"mode": "train", "task": "detect", "exist_ok": False, **bad}))
        before = tree_digest(project)
        line = one_line_error(invoke(["train", "--data", tiny_data, "--epochs", 1, "--imgsz", 64, "--project",
                                      project, "--name", "fromcfg", f"cfg={cfg}"]), code=2)
        assert f"cfg file {cfg} sets {next(iter(bad))}" in line
        assert tree_digest(project) == before and not (project / "fromcfg").exists()


def test_cfg_file_is_a_set_of_training_arguments(tmp_path):
    from detector.yolo import checks

    cfg = tmp_path / "hyp.yaml"
    cfg.write_text(yaml.safe_dump({"lr0": 0.02, "mosaic": 0.0, "mode": "train", "name": None, "epochs": 100}))
    assert checks.expand_cfg({"cfg": str(cfg), "lr0": 0.01}) == {"lr0": 0.01, "mosaic": 0.0}
    cfg.write_text("- not a mapping\n")
    with pytest.raises(Exception, match="not a mapping"):
        checks.expand_cfg({"cfg": str(cfg)})


# ---- cases 3 and 4: atomic checkpoints, disk full -------------------------------------------------


def test_damaged_last_pt_falls_back_or_says_what_is_lost(tmp_path):
    import torch

    from detector.errors import RunDirError
    from detector.train import resuming

    wdir = tmp_path / "weights"
    wdir.mkdir()
    (wdir / "last.pt").write_bytes(b"torn" * 100)
    (wdir / ".last.pt.123.tmp").write_bytes(b"half")
    with pytest.raises(RunDirError, match="damaged and no earlier checkpoint"):
        resuming.plan(tmp_path)
    torch.save({"epoch": 1, "ema": None, "optimizer": {"state": {}}, "train_args": {"epochs": 5}}, wdir / "best.pt")
    plan = resuming.plan(tmp_path)
    assert plan.action == "train" and "resuming from best.pt (epoch 2)" in plan.note
    assert (wdir / "last.pt").read_bytes() == (wdir / "best.pt").read_bytes()
    assert not (wdir / ".last.pt.123.tmp").exists()


def _enospc_on(monkeypatch, name: str, after: int = 0):
    """Make fsync of files named `name` fail with ENOSPC, from the (after+1)-th such call on."""
    real, calls = os.fsync, []

    def fsync(fd):
        if name in os.readlink(f"/proc/self/fd/{fd}"):
            calls.append(fd)
            if len(calls) > after:
                raise OSError(errno.ENOSPC, "No space left on device", os.readlink(f"/proc/self/fd/{fd}"))
        return real(fd)

    monkeypatch.setattr(os, "fsync", fsync)


@pytest.mark.skipif(not Path("/proc/self/fd").exists(), reason="needs /proc to name the file being written")
def test_atomic_write_keeps_the_old_file_when_the_disk_is_full(tmp_path, monkeypatch):
    from detector.yolo import checkpoints

    target = tmp_path / "last.pt"
    checkpoints.write_bytes_atomic(target, b"good")
    _enospc_on(monkeypatch, "last.pt")
    with pytest.raises(OSError):
        checkpoints.write_bytes_atomic(target, b"new" * 1000)
    assert target.read_bytes() == b"good" and [p.name for p in tmp_path.iterdir()] == ["last.pt"]


@pytest.mark.skipif(not Path("/proc/self/fd").exists(), reason="needs /proc to name the file being written")
def test_disk_full_is_one_line_and_a_failed_run(tiny_data, tmp_path, monkeypatch):  # case 4
    _enospc_on(monkeypatch, "last.pt", after=1)  # epoch 1's checkpoint is written, epoch 2's is not
    run_dir = tmp_path / "full"
    line = one_line_error(invoke(["train", "--data", tiny_data, "--epochs", 2, "--imgsz", 64, "--batch", BATCH,
                                  "--project", tmp_path, "--name", "full", "plots=False", "val=False"]))
    assert line.startswith("Error: disk full while writing") and "last.pt" in line
    run = json.loads((run_dir / "run.json").read_text())
    assert run["status"] == "failed" and run["error"].startswith("disk full while writing")
    monkeypatch.undo()
    assert checkpoint_epoch(run_dir) == 1  # the good checkpoint stayed in place
    assert not list((run_dir / "weights").glob(".*.tmp"))


# ---- case 5: no network, native threads included ---------------------------------------------------


def traced_cli(args: list, tmp_path: Path) -> tuple[subprocess.CompletedProcess, list[str]]:
    """Run the installed entry point under the network guard and, where strace exists, under strace too.

    The guard sees Python's sockets; strace also sees those of native threads (onnxruntime's
    telemetry). Returns the process and every AF_INET/AF_INET6 connect either of them saw.
    """
    exe = str(Path(sys.executable).with_name("detector"))
    trace = tmp_path / "strace.txt"
    strace = ["strace", "-f", "-e", "trace=connect", "-o", str(trace)] if shutil.which("strace") else []
    proc = subprocess.run([*strace, exe, *map(str, args)], env=guarded_env(tmp_path), capture_output=True,
                          text=True, timeout=300)
    if strace and proc.returncode != 0 and "ptrace" in proc.stderr:
        pytest.skip("ptrace is not permitted here")
    log = tmp_path / "netlog.txt"
    seen = log.read_text().splitlines() if log.exists() else []
    if trace.exists():
        seen += [line for line in trace.read_text().splitlines() if "AF_INET" in line]
    return proc, seen


def test_augment_check_makes_no_network_attempt(tmp_path):
    proc, seen = traced_cli(["augment", "check", "heavy"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert seen == []


def test_dataset_check_makes_no_network_attempt(tiny_data, tmp_path):
    proc, seen = traced_cli(["datasets", "check", tiny_data], tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert seen == []


@pytest.mark.skipif(shutil.which("strace") is None, reason="strace sees native threads' sockets; not installed")
def test_onnx_predict_makes_no_network_attempt_even_from_native_threads(faulted, tiny_data, tmp_path):
    from detector.yolo import inference

    onnx = inference.export_model(faulted["run_dir"] / "weights" / "best.pt", "onnx", 64)
    proc, seen = traced_cli(["predict", onnx, tiny_data.parent / "images" / "val", "--out", tmp_path / "pred"],
                            tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert seen == []


# ---- case 6: a run in use --------------------------------------------------------------------------


def test_resume_refuses_a_run_in_use(tmp_path):
    run_dir = tmp_path / "busy"
    (run_dir / "weights").mkdir(parents=True)
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from detector.train.lock import RunLock; "
                               "lock = RunLock(sys.argv[1]).acquire(); print('held', flush=True); time.sleep(60)",
                               str(run_dir)], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        (run_dir / "run.json").write_text(json.dumps({"status": "interrupted"}))
        assert holder.stdout.readline().strip() == "held"
        line = one_line_error(invoke(["train", "--resume", run_dir]))
        assert f"is in use by pid {holder.pid}" in line
        # The lock dies with its process; a run.json naming a live training process still refuses.
        holder.kill()
        holder.wait()
        sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
        try:
            import platform

            state = {"status": "running", "pid": sleeper.pid, "host": platform.node()}
            (run_dir / "run.json").write_text(json.dumps(state))
            line = one_line_error(invoke(["train", "--resume", run_dir]))
            assert f"still training in process {sleeper.pid}" in line
            assert json.loads((run_dir / "run.json").read_text()) == state  # refused, untouched
        finally:
            sleeper.kill()
            sleeper.wait()
    finally:
        if holder.poll() is None:
            holder.kill()


# ---- cases 8, 10, 12: bad inputs give one line, before any folder exists ---------------------------


@pytest.fixture()
def data_copy(tiny_data, tmp_path) -> Path:
    root = tmp_path / "data"
    shutil.copytree(tiny_data.parent, root)
    raw = yaml.safe_load((root / "data.yaml").read_text())
    raw["path"] = str(root)
    (root / "data.yaml").write_text(yaml.safe_dump(raw))
    return root


@pytest.mark.parametrize("change, message", [
    ({"nc": "abc"}, "nc is 'abc', not a whole number"),
    ({"nc": [4]}, "nc is [4], not a whole number"),
    ({"nc": 4.7}, "nc is 4.7, not a whole number"),
    ({"names": {"a": "circle", "b": "square"}}, "'names:' has the key 'a'"),
    ({"names": {0: "a", 1: "b", 2: "c", 3: "d", 7: "e"}}, "skips class ids 4, 5, 6"),
    ({"names": {0: "a", 1: "b", 3: "d"}}, "skips class id 2"),
])
def test_bad_data_yaml_is_one_line_before_any_folder(data_copy, tmp_path, change, message):
    raw = yaml.safe_load((data_copy / "data.yaml").read_text())
    raw.pop("nc", None)
    raw.update(change)
    (data_copy / "bad.yaml").write_text(yaml.safe_dump(raw))
    assert message in one_line_error(invoke(["datasets", "check", data_copy / "bad.yaml"]))
    project = tmp_path / "runs"
    assert message in one_line_error(invoke(["train", "--data", data_copy / "bad.yaml", "--epochs", 1, "--imgsz", 64,
                                             "--project", project, "--name", "x"]))
    assert not (project / "x").exists()


@pytest.mark.parametrize("cls", ["nan", "inf", "2.5"])
def test_non_integer_class_id_is_named(data_copy, cls):
    label = sorted((data_copy / "labels" / "train").glob("*.txt"))[0]
    label.write_text(f"{cls} 0.5 0.5 0.2 0.2\n")
    result = invoke(["datasets", "check", data_copy / "data.yaml"])
    one_line_error(result)
    assert f"class id {cls} is not a whole number" in result.output


def test_data_folder_instead_of_yaml_says_which_yaml(data_copy):
    line = one_line_error(invoke(["datasets", "check", data_copy]))
    assert f"{data_copy} is a folder; pass its data YAML such as {data_copy / 'data.yaml'}" in line


def test_symlink_loop_in_image_folder_is_refused(data_copy):  # case 9
    (data_copy / "images" / "train" / "up").symlink_to("..")
    line = one_line_error(invoke(["datasets", "check", data_copy / "data.yaml"]))
    assert "through a symlink" in line and "remove the link" in line


@pytest.mark.parametrize("content", ["{", "[]"])
def test_resume_on_damaged_run_json_is_one_line(tmp_path, content):
    (tmp_path / "run.json").write_text(content)
    assert "run.json is damaged" in one_line_error(invoke(["train", "--resume", tmp_path]))


def test_ctrl_c_during_dataset_check_exits_130(data_copy, tmp_path, monkeypatch):
    from detector.data import check

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(check, "require_trainable", interrupted)
    line = one_line_error(invoke(["train", "--data", data_copy / "data.yaml", "--epochs", 1, "--imgsz", 64,
                                  "--project", tmp_path / "runs", "--name", "x"]), code=130)
    assert "no run folder was created" in line and not (tmp_path / "runs" / "x").exists()


def test_default_run_names_are_unique(tmp_path):
    from detector.train.run import _make_run_dir

    first, second = _make_run_dir(tmp_path, None), _make_run_dir(tmp_path, None)
    assert first != second and first.is_dir() and second.is_dir()


def test_predict_on_a_run_without_weights_says_so(tmp_path):
    run_dir = tmp_path / "r"
    run_dir.mkdir()
    (run_dir / "run.json").write_text("{}")
    image = tmp_path / "img.png"
    import numpy as np
    from PIL import Image

    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(image)
    line = one_line_error(invoke(["predict", run_dir, image, "--out", tmp_path / "out"]))
    assert "has no weights/best.pt" in line and not (tmp_path / "out").exists()


def test_compare_default_output_is_never_the_filesystem_root(tmp_path, monkeypatch):
    from detector.report import render

    monkeypatch.chdir(tmp_path)
    assert render.default_out(["/a/r1", "/b/r2"]) == tmp_path / "compare"
    assert render.default_out([tmp_path / "runs" / "a", tmp_path / "runs" / "b"]) == tmp_path / "runs"
