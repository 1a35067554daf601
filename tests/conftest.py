"""Shared fixtures: a network guard, a tiny real dataset and one real tiny training.

The training is real (Ultralytics on CPU, a few iterations) and shared by the
whole session; tests read its files instead of training again.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NETGUARD = Path(__file__).parent / "netguard"
COCO128 = ROOT.parent / "shared" / "data" / "coco128" / "coco128.yaml"


@pytest.fixture(scope="session", autouse=True)
def detector_home(tmp_path_factory):
    """A private DETECTOR_HOME so tests never touch the user's cache or settings."""
    home = tmp_path_factory.mktemp("detector-home")
    os.environ["DETECTOR_HOME"] = str(home)
    return home


@pytest.fixture(scope="session", autouse=True)
def network_guard(detector_home):
    """Fail any test that opens an internet socket or resolves a name in this process."""
    attempts: list[str] = []
    saved = (socket.socket.connect, socket.socket.connect_ex, socket.getaddrinfo, socket.gethostbyname)

    def refuse(what):
        attempts.append(what)
        raise OSError(f"network access blocked by the test suite: {what}")

    def loopback(host) -> bool:  # the loopback_allowed fixture lets Ray talk to itself
        return os.environ.get("DETECTOR_NETGUARD_LOOPBACK") == "1" and host in ("127.0.0.1", "localhost", "::1")

    def connect(self, address, *a):
        if self.family == socket.AF_UNIX or (isinstance(address, tuple) and loopback(address[0])):
            return saved[0](self, address, *a)
        refuse(f"connect {address!r}")

    def connect_ex(self, address, *a):
        if self.family == socket.AF_UNIX or (isinstance(address, tuple) and loopback(address[0])):
            return saved[1](self, address, *a)
        refuse(f"connect_ex {address!r}")

    socket.socket.connect, socket.socket.connect_ex = connect, connect_ex
    socket.getaddrinfo = lambda host, *a, **k: saved[2](host, *a, **k) if loopback(host) else refuse(f"getaddrinfo {host!r}")
    socket.gethostbyname = lambda host: refuse(f"gethostbyname {host!r}")
    yield attempts
    socket.socket.connect, socket.socket.connect_ex, socket.getaddrinfo, socket.gethostbyname = saved


@pytest.fixture(autouse=True)
def no_network_attempts(network_guard):
    """Each test ends with no network attempt made during it."""
    before = len(network_guard)
    yield
    assert network_guard[before:] == [], f"network access attempted: {network_guard[before:]}"


def guarded_env(tmp_path: Path | None = None) -> dict:
    """Environment for a subprocess: same DETECTOR_HOME, network guard loaded via sitecustomize."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(NETGUARD), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    if tmp_path is not None:
        env["DETECTOR_NETLOG"] = str(tmp_path / "netlog.txt")
        env["XDG_CONFIG_HOME"] = str(tmp_path / "xdg-config")  # where the user's own Ultralytics settings live
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def detector_exe() -> str:
    """The installed `detector` entry point of this environment."""
    exe = Path(sys.executable).with_name("detector")
    assert exe.exists(), f"the detector console script is not installed next to {sys.executable}"
    return str(exe)


def run_cli(args: list[str], tmp_path: Path | None = None, timeout: float = 600, **kw) -> subprocess.CompletedProcess:
    """Run the installed entry point in a subprocess under the network guard."""
    return subprocess.run([detector_exe(), *args], env=guarded_env(tmp_path), capture_output=True, text=True,
                          timeout=timeout, **kw)


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """A real built-in-style dataset small enough for seconds of training: 40 train, 16 val at 64 px."""
    from detector.data import synth

    out = tmp_path_factory.mktemp("tiny-data") / "shapes"
    return synth.generate(synth.SynthSpec(train_images=40, val_images=16, imgsz=64, seed=3), out)


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, tiny_data) -> Path:
    """One real CPU training shared by the session: 2 epochs, batch 16, 40 images -> 3 iterations/epoch."""
    from click.testing import CliRunner

    from detector.cli import main

    project = tmp_path_factory.mktemp("runs")
    result = CliRunner().invoke(main, ["train", "--data", str(tiny_data), "--epochs", "2", "--imgsz", "64",
                                       "--batch", "16", "--project", str(project), "--name", "tiny",
                                       "plots=False"])
    assert result.exit_code == 0, result.output + repr(result.exception)
    return project / "tiny"


@pytest.fixture(scope="session")
def coco128_yaml() -> Path:
    """../shared/data/coco128 when present (CI always has it), else skip with that reason."""
    if not COCO128.exists():
        pytest.skip(f"coco128 not found at {COCO128} (it lives in ../shared beside the checkout)")
    return COCO128
