"""Pretrained weights: the cache and the one download a user asks for.

A loopback HTTP server started here serves a real .pt (the tiny run's best.pt)
as DETECTOR_WEIGHTS_URL. Every failure must be one line and leave nothing in the
cache: a 404, a transfer cut short, Ctrl-C mid-download, a refused connection.
"""

from __future__ import annotations

import hashlib
import json
import signal
import socket
import subprocess
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from click.testing import CliRunner

from detector.cli import main
from tests.conftest import detector_exe, guarded_env


class _Weights(BaseHTTPRequestHandler):
    """GET /NAME.pt: the payload; /missing.pt: 404; /truncated.pt: half of what it announces; /slow.pt: stalls."""

    payload = b""
    release = threading.Event()
    requests: list[str] = []

    def do_GET(self):
        self.requests.append(self.path)
        name = self.path.rsplit("/", 1)[-1]
        if name == "missing.pt":
            self.send_error(404, "Not Found")
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(self.payload)))
        self.end_headers()
        if name == "truncated.pt":
            self.wfile.write(self.payload[: len(self.payload) // 2])
            return  # the connection closes short of Content-Length
        if name == "slow.pt":
            self.wfile.write(self.payload[: 1 << 17])
            self.wfile.flush()
            self.release.wait(20)  # until the test has interrupted the client
            return
        self.wfile.write(self.payload)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def weights_server(tiny_run):
    _Weights.payload = (tiny_run / "weights" / "best.pt").read_bytes()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Weights)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    _Weights.release.set()
    server.shutdown()
    server.server_close()


@pytest.fixture
def home(tmp_path, monkeypatch, weights_server) -> Path:
    """A fresh DETECTOR_HOME (empty cache), loopback allowed, DETECTOR_WEIGHTS_URL at the test server."""
    monkeypatch.setenv("DETECTOR_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("DETECTOR_WEIGHTS_URL", weights_server)
    monkeypatch.setenv("DETECTOR_NETGUARD_LOOPBACK", "1")  # the network guard lets 127.0.0.1 through, nothing else
    monkeypatch.delenv("DETECTOR_DOWNLOAD", raising=False)
    return tmp_path / "home"


def _cache(home: Path) -> list[str]:
    folder = home / "weights"
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def _fetch(name: str):
    return CliRunner().invoke(main, ["weights", "fetch", name])


def _error_line(result) -> str:
    lines = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(lines) == 1, result.output
    return lines[0]


def test_fetch_success_then_cached_without_network(home, weights_server, monkeypatch):
    result = _fetch("yolo11n.pt")
    assert result.exit_code == 0, result.output
    assert "100%" in result.output  # the progress bar (stderr is mixed into CliRunner's output)
    assert _cache(home) == ["yolo11n.pt", "yolo11n.pt.json"]
    cached = home / "weights" / "yolo11n.pt"
    assert cached.read_bytes() == _Weights.payload
    sha = hashlib.sha256(_Weights.payload).hexdigest()
    assert sha in result.output

    # Offline now: the cache answers, with the URL it came from, and no connection is attempted.
    monkeypatch.delenv("DETECTOR_NETGUARD_LOOPBACK")
    from detector.weights import cache

    source = cache.resolve("yolo11n.pt")
    assert source == {"name": "yolo11n.pt", "path": str(cached), "url": f"{weights_server}/yolo11n.pt",
                      "sha256": sha, "size": len(_Weights.payload), "downloaded": False}
    listed = CliRunner().invoke(main, ["weights", "list"])
    assert listed.exit_code == 0 and "yolo11n.pt" in listed.output and weights_server in listed.output


def test_missing_from_cache_names_file_folder_and_download(home, tmp_path, tiny_data):
    result = CliRunner().invoke(main, ["train", "--data", str(tiny_data), "--model", "yolov8n.pt", "--epochs", "1",
                                       "--project", str(tmp_path / "runs")])
    assert result.exit_code == 1
    line = _error_line(result)
    assert "yolov8n.pt" in line and str(home / "weights") in line and "--download" in line
    assert not (tmp_path / "runs").exists() and _cache(home) == []
    assert not _Weights.requests or all("yolov8n" not in r for r in _Weights.requests)


@pytest.mark.parametrize("name,expected", [
    ("missing.pt", "HTTP 404"),
    ("truncated.pt", "nothing was written"),
])
def test_failed_download_is_one_line_and_leaves_nothing(home, name, expected):
    result = _fetch(name)
    assert result.exit_code == 1
    assert expected in _error_line(result) and name in _error_line(result)
    assert _cache(home) == []


def test_connection_refused_reads_as_offline(home, monkeypatch):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("DETECTOR_WEIGHTS_URL", f"http://127.0.0.1:{port}")
    result = _fetch("yolo11n.pt")
    assert result.exit_code == 1
    line = _error_line(result)
    assert "connection refused" in line and "offline" in line and "yolo11n.pt" in line
    assert _cache(home) == []


def test_not_a_detection_model_is_refused_before_downloading(home):
    before = len(_Weights.requests)
    result = _fetch("yolo11n-seg.pt")
    assert result.exit_code == 1 and "not a detection model" in _error_line(result)
    assert len(_Weights.requests) == before


def test_ctrl_c_mid_download_leaves_nothing(home):
    # A real Ctrl-C: SIGINT to the command while the server holds the transfer half-way.
    proc = subprocess.Popen([detector_exe(), "weights", "fetch", "slow.pt"], env=guarded_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 30
    while not any(n.endswith(".part") for n in _cache(home)):
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 130, out + err
    assert err.strip().count("\n") == 0 and "interrupted" in err and "nothing was written" in err
    assert _cache(home) == []


def test_train_fine_tunes_downloaded_weights_and_records_them(home, weights_server, tiny_data, tmp_path):
    project = tmp_path / "runs"
    result = CliRunner().invoke(main, ["train", "--data", str(tiny_data), "--model", "yolo11n.pt", "--download",
                                       "--epochs", "1", "--imgsz", "64", "--batch", "16", "--project", str(project),
                                       "--name", "ft", "plots=False"])
    assert result.exit_code == 0, result.output + repr(result.exception)
    meta = json.loads((project / "ft" / "run.json").read_text())
    weights = meta["config"]["weights"]
    assert weights["url"] == f"{weights_server}/yolo11n.pt" and weights["downloaded"] is True
    assert weights["sha256"] == hashlib.sha256(_Weights.payload).hexdigest()
    assert weights["path"] == str(home / "weights" / "yolo11n.pt")
    assert meta["config"]["model"] == "yolo11n.pt" and meta["status"] == "completed"


def test_detector_download_env_allows_the_fetch(home, monkeypatch):
    from detector.weights import cache

    monkeypatch.setenv("DETECTOR_DOWNLOAD", "1")  # what a sweep or a script sets instead of --download
    source = cache.resolve("yolov8n.pt")
    assert source["downloaded"] is True and source["url"].endswith("/yolov8n.pt")
    assert _cache(home) == ["yolov8n.pt", "yolov8n.pt.json"]
