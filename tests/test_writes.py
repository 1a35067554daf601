"""Every file the tool writes is the old one or the complete new one (detector.fileio), on a kill or a full disk.

Issue 20, the write side: kills are real SIGKILLs of `detector` subprocesses
(tests/faultchild.py patches the fault in from outside); a full disk is a real
tiny tmpfs where the test may mount one (root), else these tests skip.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import subprocess
import sys
import threading
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from click.testing import CliRunner

from detector import fileio
from detector.cli import main
from detector.errors import DiskFull

from .conftest import guarded_env

ROOT = Path(__file__).resolve().parents[1]
CHILD = Path(__file__).parent / "faultchild.py"


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def one_line_error(result) -> str:
    assert result.exit_code != 0, result.output
    assert "Traceback" not in result.output, result.output
    lines = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(lines) == 1, result.output
    return lines[0]


def killed(phase: str, args: list, tmp_path: Path) -> subprocess.CompletedProcess:
    """`detector ARGS` SIGKILLed at phase (see tests/faultchild.py)."""
    cmd = [sys.executable, str(CHILD), phase, "kill", "--", *map(str, args)]
    proc = subprocess.run(cmd, env=guarded_env(tmp_path), capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == -9, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc


def digest(folder: Path) -> dict:
    return {str(p.relative_to(folder)): hashlib.sha1(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def staging_left(folder: Path) -> list[str]:
    return [p.name for p in folder.rglob(".*") if fileio.STAGING in p.name or p.name.endswith(fileio.TMP_SUFFIX)]


@pytest.fixture
def tiny_disk(tmp_path):
    """A 4 MiB tmpfs (a real disk that fills up), or skip where mounting is not allowed."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    if not shutil.which("mount") or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mnt)],
                                                   capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def fill(disk: Path, leave: int) -> None:
    """Fill disk until only about `leave` bytes are free."""
    st = os.statvfs(disk)
    free = st.f_bavail * st.f_frsize
    with open(disk / f"filler-{uuid.uuid4().hex[:6]}", "wb") as f:
        f.write(b"\0" * max(0, free - leave))


# ---- the module itself --------------------------------------------------------------------------------------------


def test_write_replaces_whole_or_not_at_all(tmp_path, monkeypatch):
    target = tmp_path / "run.json"
    fileio.write_json(target, {"v": 1})
    real = os.fsync

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(fileio.os, "fsync", full)
    with pytest.raises(DiskFull) as caught:
        fileio.write_json(target, {"v": 2})
    monkeypatch.setattr(fileio.os, "fsync", real)
    assert caught.value.filename == str(target) and str(target) in str(caught.value)
    assert isinstance(caught.value, OSError) and caught.value.errno == errno.ENOSPC
    assert json.loads(target.read_text()) == {"v": 1} and sorted(os.listdir(tmp_path)) == ["run.json"]
    with pytest.raises(RuntimeError), fileio.atomic(target, "w") as f:  # the caller's error: old file kept
        f.write("half")
        raise RuntimeError("stopped")
    assert json.loads(target.read_text()) == {"v": 1} and sorted(os.listdir(tmp_path)) == ["run.json"]


def test_torch_save_disk_full_text_names_the_destination(tmp_path):
    target = tmp_path / "last.pt"
    with pytest.raises(DiskFull, match="last.pt"), fileio.atomic(target) as f:
        f.write(b"x")
        raise RuntimeError("[enforce fail at inline_container.cc:603] . unexpected pos; No space left on device")
    assert not list(tmp_path.iterdir())


def test_parallel_writers_never_share_a_temporary_file(tmp_path):
    target, errors = tmp_path / "shared.json", []

    def writer(k):
        try:
            for i in range(30):
                fileio.write_json(target, {"writer": k, "i": i, "pad": "x" * 5000})
        except Exception as e:  # pragma: no cover - the assertion below shows it
            errors.append(e)

    threads = [threading.Thread(target=writer, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and json.loads(target.read_text())["i"] == 29
    assert sorted(os.listdir(tmp_path)) == ["shared.json"]


def test_one_module_renames_files_into_place():
    users = [p for p in (ROOT / "detector").rglob("*.py") if "os.replace(" in p.read_text(encoding="utf-8")]
    assert [p.relative_to(ROOT).as_posix() for p in users] == ["detector/fileio.py"]


def test_stale_staging_of_a_dead_process_is_removed(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)
    (tmp_path / f".staging-{pid}-abcd1234").mkdir()
    (tmp_path / f".report.html.{pid}-1-2.tmp").write_text("half")
    (tmp_path / f".staging-{os.getpid()}-live0000").mkdir()  # this process's own: kept
    (tmp_path / ".hidden").write_text("the user's")
    fileio.remove_stale(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".hidden", f".staging-{os.getpid()}-live0000"]


# ---- case 3: SIGKILL during `detector export` ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def export_run(tiny_run, tmp_path_factory) -> Path:
    return Path(shutil.copytree(tiny_run, tmp_path_factory.mktemp("writes") / "tiny"))


def test_export_killed_while_writing_keeps_the_previous_export(export_run, tmp_path):  # case 3
    out = tmp_path / "exported"
    first = invoke("export", export_run, "--imgsz", 64, "--out", out)
    assert first.exit_code == 0, first.output
    before = digest(out)
    assert set(before) == {"best.onnx", "export.json"}
    killed("onnx_save", ["export", export_run, "--imgsz", 64, "--out", out], tmp_path)
    assert {k: v for k, v in digest(out).items() if not k.startswith(".")} == before  # the previous export, intact
    # Beside the weights (no --out): a killed first export leaves neither a torn file nor a record.
    weights = export_run / "weights"
    killed("onnx_save", ["export", export_run, "--imgsz", 64], tmp_path)
    assert not (weights / "best.onnx").exists() and not (weights / "export.json").exists()
    # The next export clears what the killed ones left and puts a complete pair in place.
    again = invoke("export", export_run, "--imgsz", 64, "--out", out)
    assert again.exit_code == 0, again.output
    assert staging_left(out) == [] and sorted(p.name for p in out.iterdir()) == ["best.onnx", "export.json"]
    record = json.loads((out / "export.json").read_text())
    assert record["parity"]["passed"] and record["file_size_bytes"] == (out / "best.onnx").stat().st_size
    assert record["path"] == str((out / "best.onnx").resolve())


# ---- case 15: an unavailable format creates nothing ---------------------------------------------------------------


def test_unavailable_format_creates_nothing_and_names_no_staging(export_run, tmp_path):  # case 15
    import importlib.util

    fmt = next((f for f, module in [("coreml", "coremltools"), ("openvino", "openvino"), ("paddle", "paddle"),
                                     ("mnn", "MNN"), ("ncnn", "ncnn")] if importlib.util.find_spec(module) is None), None)
    if fmt is None:
        pytest.skip("every candidate export backend is installed here")
    out = tmp_path / "new" / "D"
    line = one_line_error(invoke("export", export_run, "--imgsz", 64, "--format", fmt, "--out", out))
    assert "staging" not in line and ".staging-" not in line
    assert not (tmp_path / "new").exists()
    # An engine the CPU cannot build: the exporter's own error names the user's weights, not the staged copy.
    line = one_line_error(invoke("export", export_run, "--imgsz", 64, "--format", "engine", "--out", out))
    assert str(export_run / "weights" / "best.pt") in line and "staging" not in line and "source" not in line
    assert not (tmp_path / "new").exists()
    existing = tmp_path / "kept"
    existing.mkdir()
    one_line_error(invoke("export", export_run, "--imgsz", 64, "--format", fmt, "--out", existing))
    assert list(existing.iterdir()) == []


# ---- case 4: `detector compare --out D` killed, or on a full disk -------------------------------------------------


def test_compare_killed_while_writing_keeps_the_previous_report(tiny_run, tmp_path):  # case 4 (kill)
    out = tmp_path / "report"
    assert invoke("compare", tiny_run, "--out", out).exit_code == 0
    before = digest(out)
    assert before["report.html"] and (out / "report.html").stat().st_size > 1000
    killed("fsync:report.html", ["compare", tiny_run, "--out", out], tmp_path)
    assert {k: v for k, v in digest(out).items() if not k.startswith(".")} == before
    assert invoke("compare", tiny_run, "--out", out).exit_code == 0
    assert staging_left(out) == []


def test_compare_on_a_full_disk_keeps_the_previous_report(tiny_run, tiny_disk):  # case 4 (full disk)
    out = tiny_disk / "report"
    assert invoke("compare", tiny_run, "--out", out).exit_code == 0
    before = digest(out)
    fill(tiny_disk, leave=64 * 1024)  # room for a plot or two, not for the whole report
    line = one_line_error(invoke("compare", tiny_run, "--out", out))
    assert line.startswith("Error: disk full while writing") and str(out) in line and ".staging" not in line
    assert digest(out) == before and staging_left(out) == []


# ---- case 13: a full disk names the destination -------------------------------------------------------------------


def test_full_disk_names_the_destination_in_export_and_convert(export_run, tiny_disk, tmp_path):  # case 13
    fill(tiny_disk, leave=16 * 1024)
    out = tiny_disk / "onnx"
    line = one_line_error(invoke("export", export_run, "--imgsz", 64, "--out", out))
    assert line.startswith("Error: disk full while writing") and str(out / "best.onnx") in line
    assert "weights" not in line.replace(str(out), "") and not out.exists()

    images = tmp_path / "imgs"
    images.mkdir()
    big = os.urandom(64 * 1024)  # larger than the space left: the copy of the image fails
    (images / "a.jpg").write_bytes(b"\xff\xd8" + big)
    instances = tmp_path / "instances.json"
    instances.write_text(json.dumps({
        "categories": [{"id": 1, "name": "thing"}],
        "images": [{"id": 1, "file_name": "a.jpg", "width": 100, "height": 80}],
        "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [10, 10, 20, 20], "iscrowd": 0}]}))
    dataset = tiny_disk / "yolo"
    line = one_line_error(invoke("datasets", "convert", "--from", "coco", instances, "--images", images,
                                 "--out", dataset))
    assert line.startswith("Error: disk full while writing") and str(dataset / "images" / "train" / "a.jpg") in line
    assert str(images) not in line


# ---- case 14: predict on a full disk ------------------------------------------------------------------------------


def test_predict_on_a_full_disk_is_one_line_and_leaves_nothing(export_run, tiny_disk):  # case 14
    from detector import runtime  # noqa: F401  (the CLI's environment, as a subprocess would have it)

    images = Path(json.loads((export_run / "run.json").read_text())["dataset"]["root"]) / "images" / "val"
    out = tiny_disk / "predictions"
    fill(tiny_disk, leave=24 * 1024)
    proc = subprocess.run([str(Path(sys.executable).with_name("detector")), "predict",
                           str(export_run / "weights" / "best.pt"), str(images), "--out", str(out), "--conf", "0.001"],
                          env=guarded_env(tiny_disk.parent), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.strip()]
    assert errors == [errors[-1]] or all("libpng" not in e for e in errors), proc.stderr
    assert "libpng" not in proc.stderr and "Traceback" not in proc.stderr
    assert errors[-1].startswith("Error: disk full while writing") and str(out) in errors[-1]
    assert ".staging" not in errors[-1] and not out.exists()


# ---- cases 6 and 16: the weights cache ----------------------------------------------------------------------------


class _Unannounced(BaseHTTPRequestHandler):
    """Serves the payload with no Content-Length; /cut.pt sends only its first part, then closes."""

    payload = b""

    def do_GET(self):
        body = self.payload[: len(self.payload) * 2 // 3] if self.path.endswith("/cut.pt") else self.payload
        self.send_response(200)
        self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(body)
        self.close_connection = True

    def log_message(self, *args):
        pass


@pytest.fixture
def unannounced(tiny_run, tmp_path, monkeypatch):
    _Unannounced.payload = (tiny_run / "weights" / "best.pt").read_bytes()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Unannounced)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("DETECTOR_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("DETECTOR_WEIGHTS_URL", f"http://127.0.0.1:{server.server_address[1]}")
    monkeypatch.setenv("DETECTOR_NETGUARD_LOOPBACK", "1")
    yield tmp_path / "home" / "weights"
    server.shutdown()
    server.server_close()


def test_truncated_download_without_length_is_never_cached(unannounced, tmp_path):  # case 6
    line = one_line_error(invoke("weights", "fetch", "cut.pt"))
    assert "cut.pt" in line and "not a complete PyTorch archive" in line and "nothing was written" in line
    assert not unannounced.exists() or list(unannounced.iterdir()) == []
    # A good file stays good: --force with a source that cuts the transfer short keeps it.
    assert invoke("weights", "fetch", "good.pt").exit_code == 0
    good = (unannounced / "good.pt").read_bytes()
    assert good == _Unannounced.payload
    (unannounced / "cut.pt").write_bytes(good)
    (unannounced / "cut.pt.json").write_text("{}")
    forced = invoke("weights", "fetch", "cut.pt", "--force")
    assert "not a complete PyTorch archive" in one_line_error(forced)
    assert (unannounced / "cut.pt").read_bytes() == good
    assert sorted(p.name for p in unannounced.iterdir()) == ["cut.pt", "cut.pt.json", "good.pt", "good.pt.json"]
    listed = invoke("weights", "list")
    assert listed.exit_code == 0 and "good.pt" in listed.output


@pytest.mark.parametrize("name", [".pt", "..pt", ". .pt", ".hidden.pt", "a/b.pt", "../x.pt", "x.PT", "x.pt/"])
def test_weights_name_must_be_a_plain_visible_file_name(name, tmp_path, monkeypatch):  # case 16
    monkeypatch.setenv("DETECTOR_HOME", str(tmp_path / "home"))
    line = one_line_error(invoke("weights", "fetch", name))
    assert "is not a weights name" in line
    assert not (tmp_path / "home" / "weights").exists() or not list((tmp_path / "home" / "weights").iterdir())
