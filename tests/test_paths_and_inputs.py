"""Nothing lost on the input side: one rule for where commands write, hostile names and files, locks.

Each numbered case of the adversarial round has a test named after it (test_caseNN_...).
The last test runs every command on a table of hostile paths and files and asserts one
line, a non-zero exit and nothing written.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from detector.cli import main

from .conftest import detector_exe, guarded_env, run_cli

ROOT = Path(__file__).resolve().parents[1]
NOT_UTF8 = os.fsdecode(b"bad-\xff\xfe-name.png")  # a name Linux allows and UTF-8 cannot spell


def invoke(args: list) -> object:
    return CliRunner().invoke(main, [str(a) for a in args])


def one_line(result, codes=(1, 2)) -> str:
    """The single 'Error: ...' line of a refused in-process command, with no traceback."""
    shown = f"{type(result.exception).__name__}: {str(result.exception)[:300]}"
    assert result.exit_code in codes, (result.exit_code, result.output[-2000:], shown)
    assert isinstance(result.exception, SystemExit), shown
    lines = [x for x in result.output.splitlines() if x.startswith("Error:")]
    assert len(lines) == 1 and "Traceback" not in result.output, result.output
    return lines[0]


def one_line_proc(proc: subprocess.CompletedProcess) -> str:
    """The same for a subprocess of the installed entry point (a crash would show as rc < 0)."""
    assert proc.returncode in (1, 2), (proc.returncode, proc.stdout[-1500:], proc.stderr[-1500:])
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = [x for x in proc.stderr.splitlines() if x.startswith("Error:")]
    assert len(lines) == 1, proc.stderr[-2000:]
    return lines[0]


def digest(folder: Path) -> dict:
    """Every file under folder (names as bytes, so undecodable names count too) with its content hash."""
    out = {}
    for dirpath, _, files in os.walk(os.fsencode(folder)):
        for f in files:
            p = os.path.join(dirpath, f)
            with open(p, "rb") as fh:
                out[p] = hashlib.sha1(fh.read()).hexdigest()
    return out


@pytest.fixture()
def data_copy(tiny_data, tmp_path) -> Path:
    """A private copy of the tiny dataset (the shared one is never damaged)."""
    root = tmp_path / "data"
    shutil.copytree(tiny_data.parent, root)
    raw = yaml.safe_load((root / tiny_data.name).read_text())
    raw["path"] = str(root)  # the generated YAML names its folder absolutely: point it at the copy
    (root / tiny_data.name).write_text(yaml.safe_dump(raw))
    return root / tiny_data.name


def hold_lock(folder: Path) -> subprocess.Popen:
    """A child process that holds folder's lock (as a live training or sweep does) until killed."""
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from detector.train.lock import RunLock; "
                               "lock = RunLock(sys.argv[1]).acquire(); print('held', flush=True); time.sleep(120)",
                               str(folder)], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    assert holder.stdout.readline().strip() == "held"
    return holder


# ---- case 1: a sweep never restarts or deletes a run (or sweep) in use -----------------------------------------

def test_case01_sweep_never_deletes_a_run_in_use(tiny_data, tmp_path):
    args = ["sweep", "--batch", "8", "--epochs", "1", "--imgsz", "64", "--data", tiny_data, "--workers", "0",
            "--project", tmp_path, "--name", "sw"]
    from detector.config import TrainConfig
    from detector.train import sweep

    config = sweep.SweepConfig(batches=(8,), name="sw", template=TrainConfig(
        data=Path(tiny_data), epochs=1, imgsz=64, workers=0, project=tmp_path))
    folder, lock = sweep.open_sweep(config)  # the first sweep, as it stands when its first run has just started
    lock.release()
    live = folder / "b8-s0"
    live.mkdir(parents=True)
    (live / "run.json").write_text(json.dumps({"name": "b8-s0", "status": "running"}))
    (live / "iterations.csv").write_text("epoch,iteration\n1,1\n")
    holder = hold_lock(live)
    try:
        line = one_line(invoke(args))
        assert "b8-s0" in line and f"in use by pid {holder.pid}" in line
        assert (live / "iterations.csv").read_text() == "epoch,iteration\n1,1\n"  # untouched
    finally:
        holder.kill()
        holder.wait()
    shutil.rmtree(live)
    holder = hold_lock(folder)  # a second sweep of a folder whose sweep is alive
    try:
        line = one_line(invoke(args))
        assert f"sweep {folder} is in use by pid {holder.pid}" in line
        assert not live.exists()
    finally:
        holder.kill()
        holder.wait()


# ---- case 2: predict never writes over its source images ---------------------------------------------------

def test_case02_predict_refuses_an_out_that_is_the_source(tiny_run, data_copy):
    root = data_copy.parent
    before = digest(root)
    weights = tiny_run / "weights" / "best.pt"
    for out in (root, root / "images" / "val" / "preds"):
        line = one_line(invoke(["predict", weights, root / "images" / "val", "--out", out]), codes=(2,))
        assert "--out" in line and ("input" in line or "dataset" in line), line
    one_line(invoke(["predict", weights, root / "images" / "val" / sorted(os.listdir(root / "images" / "val"))[0],
                     "--out", root.parent / "elsewhere" / ".." / "data"]), codes=(2,))
    assert digest(root) == before


# ---- case 5: weights named in KEY=VALUE or cfg= follow the cache rules, offline -----------------------------

def test_case05_pretrained_key_is_offline_and_refused_before_the_folder(tiny_data, tmp_path):
    cfg = tmp_path / "args.yaml"
    cfg.write_text(yaml.safe_dump({"pretrained": "yolo11s.pt", "lr0": 0.01}))
    for extra in (["pretrained=yolo11s.pt"], [f"cfg={cfg}"]):
        proc = run_cli(["train", "--data", str(tiny_data), "--epochs", "1", "--imgsz", "64", "--project",
                        str(tmp_path / "runs"), "--name", "p", *extra], tmp_path)
        line = one_line_proc(proc)
        assert "yolo11s.pt is not in the weights cache" in line and "--download" in line
        assert not (tmp_path / "runs" / "p").exists()
        assert not (tmp_path / "netlog.txt").exists(), (tmp_path / "netlog.txt").read_text()


# ---- case 7: names that are not UTF-8 ------------------------------------------------------------------------

def test_case07_non_utf8_names_are_one_line_everywhere(tiny_run, data_copy, tmp_path):
    root = data_copy.parent
    val = root / "images" / "val"
    first = sorted(val.iterdir())[0]
    os.rename(first, val / NOT_UTF8)
    before = digest(root)
    weights = tiny_run / "weights" / "best.pt"
    for args in (["predict", weights, val, "--out", tmp_path / "pred"],
                 ["datasets", "check", data_copy],
                 ["train", "--data", data_copy, "--epochs", "1", "--project", tmp_path / "runs"],
                 ["val", weights, "--data", data_copy],
                 ["augment", "preview", "--data", data_copy, "--out", tmp_path / "grid.jpg"]):
        proc = run_cli([str(a) for a in args], tmp_path)  # a subprocess: the old failure was a segfault
        line = one_line_proc(proc)
        assert "bad-\ufffd\ufffd-name.png" in line and "not valid UTF-8" in line, line
    assert digest(root) == before
    assert not (tmp_path / "pred").exists() and not (tmp_path / "runs").exists()
    assert not (tmp_path / "grid.jpg").exists()


# ---- case 8: an image bomb -----------------------------------------------------------------------------------

def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height (its pixel data is missing): a bomb to any decoder."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def test_case08_predict_on_an_image_bomb_is_one_line(tiny_run, tmp_path):
    bomb = tmp_path / "in" / "huge.png"
    bomb.parent.mkdir()
    bomb.write_bytes(png_header_only(50000, 50000))
    line = one_line(invoke(["predict", tiny_run / "weights" / "best.pt", bomb, "--out", tmp_path / "pred"]))
    assert "huge.png" in line and "2500 megapixels" in line
    assert not (tmp_path / "pred").exists()


# ---- case 9: a refused sweep writes nothing ------------------------------------------------------------------

@pytest.mark.parametrize("bad", [["--model", "nosuch.yaml"], ["--data", "missing.yaml"], ["cfg=CFG"]])
def test_case09_refused_sweep_leaves_no_sweep_json(tiny_data, tmp_path, bad):
    cfg = tmp_path / "args.yaml"
    cfg.write_text(yaml.safe_dump({"name": "elsewhere"}))
    bad = [b.replace("CFG", str(cfg)) for b in bad]
    base = ["sweep", "--batch", "8", "--epochs", "1", "--imgsz", "64", "--project", tmp_path / "p", "--name", "s"]
    data = [] if "--data" in bad else ["--data", tiny_data]
    one_line(invoke([*base, *data, *bad]))
    assert not (tmp_path / "p" / "s").exists()


# ---- case 10: cache=disk never writes into the dataset -------------------------------------------------------

def test_case10_cache_disk_keeps_npy_files_out_of_the_dataset(data_copy, tmp_path, detector_home):
    before = digest(data_copy.parent)
    result = invoke(["train", "--data", data_copy, "--epochs", "1", "--imgsz", "64", "--batch", "16", "--workers",
                     "0", "--project", tmp_path / "runs", "--name", "c", "cache=disk", "plots=False"])
    assert result.exit_code == 0, result.output
    assert digest(data_copy.parent) == before  # no .npy (and nothing else) beside the images
    cached = list((detector_home / "image-caches").rglob("*.npy"))
    assert len(cached) >= 40  # the 40 training images were cached, in the tool's folder


# ---- case 11: a signal right after run.json appears ----------------------------------------------------------

@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_case11_signal_as_run_json_appears_leaves_a_marked_run(tiny_data, tmp_path, sig):
    run_dir = tmp_path / "runs" / "r"
    proc = subprocess.Popen([detector_exe(), "train", "--data", str(tiny_data), "--epochs", "3", "--imgsz", "64",
                             "--workers", "0", "--project", str(run_dir.parent), "--name", "r", "--tensorboard"],
                            env=guarded_env(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (run_dir / "run.json").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, (proc.returncode, err[-2000:])
    assert "Error: training interrupted" in err and "Traceback" not in err
    assert json.loads((run_dir / "run.json").read_text())["status"] == "interrupted"


# ---- case 12: a run is never created inside another run --------------------------------------------------------

def test_case12_no_run_inside_another_run(tiny_run, tiny_data):
    before = digest(tiny_run)
    for project, name in ((tiny_run, "nested"), (tiny_run / "weights", "w"), (tiny_run / "new" / "deeper", "x")):
        line = one_line(invoke(["train", "--data", tiny_data, "--epochs", "1", "--imgsz", "64", "--project", project,
                                "--name", name]), codes=(2,))
        assert f"inside the run folder {tiny_run}" in line
    assert digest(tiny_run) == before


# ---- every command on hostile paths and files ---------------------------------------------------------------

HOSTILE = ["missing", "not-utf8", "folder", "empty", "garbage", "inside-dataset"]


def hostile(kind: str, tmp_path: Path, data_root: Path, suffix: str) -> Path:
    """A path of the given kind: absent, an undecodable name, a folder, an empty or garbage file, or a dataset."""
    base = tmp_path / "hostile"
    base.mkdir(exist_ok=True)
    if kind == "missing":
        return base / f"nothing-here{suffix}"
    if kind == "not-utf8":
        p = base / os.fsdecode(b"\xff\xfe" + suffix.encode())
        p.write_bytes(b"\x00\x01garbage")
        return p
    if kind == "folder":
        p = base / f"folder{suffix}"
        p.mkdir(exist_ok=True)
        return p
    if kind == "empty":
        p = base / f"empty{suffix}"
        p.write_bytes(b"")
        return p
    if kind == "garbage":
        p = base / f"garbage{suffix}"
        p.write_bytes(os.urandom(2048))
        return p
    return data_root / "images" / f"inside{suffix}"  # an output path inside a dataset (never to be written)


COMMANDS = {  # command -> (argv with X for the hostile path, the suffix X takes, kinds that apply)
    "train --data": (["train", "--data", "X", "--epochs", "1", "--project", "OUT"], ".yaml", HOSTILE[:5]),
    "batch --data": (["batch", "--data", "X"], ".yaml", HOSTILE[:5]),
    "datasets check": (["datasets", "check", "X"], ".yaml", HOSTILE[:5]),
    "predict weights": (["predict", "X", "IMAGES", "--out", "OUT"], ".pt", HOSTILE[:5]),
    "predict source": (["predict", "WEIGHTS", "X", "--out", "OUT"], ".jpg", HOSTILE[:5]),
    "predict --out": (["predict", "WEIGHTS", "IMAGES", "--out", "X"], "", ["inside-dataset"]),
    "export": (["export", "X", "--out", "OUT"], ".pt", HOSTILE[:5]),
    "val": (["val", "X", "--data", "DATA"], ".pt", HOSTILE[:5]),
    "compare": (["compare", "X", "--out", "OUT"], "", HOSTILE[:5]),
    "compare --out": (["compare", "RUN", "--out", "X"], "", ["inside-dataset"]),
    "tensorboard": (["tensorboard", "X"], "", HOSTILE[:5]),
    "augment check": (["augment", "check", "X"], ".yaml", HOSTILE[:5]),
    "augment preview --out": (["augment", "preview", "--data", "DATA", "--out", "X"], ".jpg", ["inside-dataset"]),
    "convert": (["datasets", "convert", "--from", "coco", "X", "--images", "IMAGES", "--out", "OUT"], ".json",
                HOSTILE[:5]),
}
CASES = [(cmd, kind) for cmd, (_, _, kinds) in COMMANDS.items() for kind in kinds]


@pytest.mark.parametrize("command, kind", CASES, ids=[f"{c}-{k}" for c, k in CASES])
def test_hostile_input_is_one_line_and_writes_nothing(command, kind, tiny_run, data_copy, tmp_path):
    argv, suffix, _ = COMMANDS[command]
    root = data_copy.parent
    x = hostile(kind, tmp_path, root, suffix)
    swap = {"X": x, "OUT": tmp_path / "out", "DATA": data_copy, "IMAGES": root / "images" / "val",
            "WEIGHTS": tiny_run / "weights" / "best.pt", "RUN": tiny_run}
    watched = {"tmp": tmp_path, "data": root, "run": tiny_run}
    before = {k: digest(v) for k, v in watched.items()}
    cwd_before = sorted(os.listdir("."))
    one_line(invoke([swap.get(a, a) for a in argv]))
    assert {k: digest(v) for k, v in watched.items()} == before
    assert sorted(os.listdir(".")) == cwd_before
