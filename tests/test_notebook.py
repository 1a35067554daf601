"""docs/examples/quickstart.ipynb executed by a real Jupyter kernel (nbclient + ipykernel), outputs asserted.

The kernel spec is written into the test's own folder (JUPYTER_PATH), for this
environment's Python, so no user kernel or Jupyter config is read. The kernel
loads the network guard like every subprocess the tests start: loopback only
(the kernel's own ZeroMQ channels), nothing else.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import NETGUARD, ROOT

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")
pytest.importorskip("pandas")
pytestmark = pytest.mark.slow

NOTEBOOK = ROOT / "docs" / "examples" / "quickstart.ipynb"
KERNEL = "detector-test"


@pytest.fixture
def kernel_env(tmp_path, monkeypatch):
    """A kernel spec for this Python in tmp_path, and the environment the kernel starts in."""
    prefix = tmp_path / "jupyter"
    subprocess.run([sys.executable, "-m", "ipykernel", "install", "--prefix", str(prefix), "--name", KERNEL],
                   check=True, capture_output=True, timeout=120)
    netlog = tmp_path / "netlog.txt"
    for key, value in {"JUPYTER_PATH": str(prefix / "share" / "jupyter"), "JUPYTER_RUNTIME_DIR": str(tmp_path / "rt"),
                       "JUPYTER_CONFIG_DIR": str(tmp_path / "jcfg"), "IPYTHONDIR": str(tmp_path / "ipython"),
                       "MPLBACKEND": "Agg", "DETECTOR_NETGUARD_LOOPBACK": "1", "DETECTOR_NETLOG": str(netlog),
                       "PYTHONPATH": os.pathsep.join([str(NETGUARD), os.environ.get("PYTHONPATH", "")]).rstrip(
                           os.pathsep)}.items():
        monkeypatch.setenv(key, value)
    return netlog


def outputs(cell, mime: str) -> list[str]:
    return [o["data"][mime] for o in cell.get("outputs", []) if mime in o.get("data", {})]


def stream(cell) -> str:
    return "".join(o["text"] for o in cell.get("outputs", []) if o["output_type"] == "stream")


def test_quickstart_notebook_runs_and_shows_runs_tables_and_the_report(kernel_env, tmp_path):
    nb = nbformat.read(NOTEBOOK, as_version=4)
    work = tmp_path / "work"
    work.mkdir()
    client = nbclient.NotebookClient(nb, kernel_name=KERNEL, timeout=300, startup_timeout=120,
                                     resources={"metadata": {"path": str(work)}})
    client.execute()
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert not [o for c in code for o in c.outputs if o["output_type"] == "error"]
    train, shown, epochs, iterations, opened, planned, compared = code
    # training: one line per epoch from the record, none of Ultralytics' per-iteration bars
    text = stream(train)
    print(text)  # shown with -s: what a notebook user sees while the cell trains
    assert "nb-b16 epoch 1/2:" in text and "nb-b16 epoch 2/2:" in text, text
    assert "it/s" not in text and len(text.splitlines()) < 20, text
    assert "data:image/png;base64," in outputs(shown, "text/html")[0]
    assert "<table" in outputs(epochs, "text/html")[0] and "map50_95" in outputs(epochs, "text/plain")[0]
    assert "lr" in outputs(iterations, "text/plain")[0]
    assert outputs(opened, "text/plain")[0] == "('completed', 16, 16, 'best.pt')"
    # the memory model inside a kernel: its second reference trace runs in a forked child of the kernel
    assert outputs(planned, "text/plain")[0] == "{'8': 64, '24': 64}"
    assert "nb-b32 epoch 2/2:" in stream(compared)
    page = outputs(compared, "text/html")[0]
    assert page.startswith("<iframe") and "nb-b16" in page and "nb-b32" in page
    assert (work / "runs" / "nb-compare" / "report.html").is_file()
    assert not kernel_env.exists() or kernel_env.read_text() == "", kernel_env.read_text()
