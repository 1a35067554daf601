"""detector train/sweep --mlflow: a real `mlflow server` on loopback (SQLite backend), read back with MlflowClient.

The server and the trainings talk over loopback only: the network guard lets
127.0.0.1 through (DETECTOR_NETGUARD_LOOPBACK) and nothing else, in this process
and in the server's processes, so MLflow's own telemetry would fail the test.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import pytest
from click.testing import CliRunner

from detector.cli import main
from detector.record import mlflow_log

from .conftest import NETGUARD

pytest.importorskip("mlflow")
pytestmark = pytest.mark.slow

SERVER_ENV = {"DETECTOR_NETGUARD_LOOPBACK": "1", "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """`mlflow server` on 127.0.0.1 with a SQLite backend and served artifacts, under the network guard."""
    folder = tmp_path_factory.mktemp("mlflow-server")
    port, netlog = free_port(), folder / "netlog.txt"
    env = {**os.environ, **SERVER_ENV, "DETECTOR_NETLOG": str(netlog),
           "PYTHONPATH": os.pathsep.join([str(NETGUARD), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    exe = Path(sys.executable).with_name("mlflow")
    proc = subprocess.Popen([str(exe), "server", "--backend-store-uri", f"sqlite:///{folder / 'mlflow.db'}",
                             "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
                            cwd=folder, env=env, stdout=open(folder / "server.log", "w"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DETECTOR_NETGUARD_LOOPBACK", "1")
        try:
            deadline = time.time() + 120
            while True:
                try:
                    urllib.request.urlopen(f"{url}/health", timeout=2).read()
                    break
                except OSError:
                    if proc.poll() is not None or time.time() > deadline:
                        pytest.fail("mlflow server did not start: " + (folder / "server.log").read_text()[-2000:])
                    time.sleep(0.5)
            yield SimpleNamespace(url=url, netlog=netlog, folder=folder)
        finally:
            proc.terminate()
            proc.wait(30)


def train(args: list[str]) -> str:
    result = CliRunner().invoke(main, ["train", *args])
    assert result.exit_code == 0, result.output + repr(result.exception)
    return result.output


def tiny(tiny_data: Path, project: Path, name: str, epochs: int = 2) -> list[str]:
    return ["--data", str(tiny_data), "--epochs", str(epochs), "--imgsz", "64", "--batch", "16", "--project",
            str(project), "--name", name, "plots=False"]


def read_csv_rows(path: Path) -> int:
    return len(path.read_text().strip().splitlines()) - 1


def test_train_logs_params_every_row_and_files_to_a_tracking_server(server, tiny_data, tmp_path):
    from mlflow.tracking import MlflowClient

    output = train([*tiny(tiny_data, tmp_path, "ml"), "--mlflow", server.url])
    run_dir = tmp_path / "ml"
    meta = json.loads((run_dir / "run.json").read_text())
    assert meta["mlflow"]["uri"] == server.url and meta["mlflow"]["run_id"]
    client = MlflowClient(server.url)
    run = client.get_run(meta["mlflow"]["run_id"])
    assert run.info.status == "FINISHED" and run.info.run_name == "ml"
    # the effective config and the batch decision
    assert run.data.params["batch.chosen"] == "16" and run.data.params["epochs"] == "2"
    assert run.data.params["batch.reason"] == meta["batch"]["reason"][:6000]
    assert run.data.params["ultralytics.imgsz"] == "64" and run.data.tags["batch_used"] == "16"
    # every iteration's losses and lr at step = iteration; every epoch's metrics at step = epoch
    iterations = read_csv_rows(run_dir / "iterations.csv")
    for key in ("iteration/loss", "iteration/box_loss", "iteration/cls_loss", "iteration/dfl_loss", "iteration/lr"):
        history = client.get_metric_history(run.info.run_id, key)
        assert sorted(m.step for m in history) == list(range(1, iterations + 1)), key
    for key in ("metrics/map50", "metrics/map50_95", "val/box_loss", "train/box_loss", "epoch/lr"):
        assert [m.step for m in client.get_metric_history(run.info.run_id, key)] == [1, 2], key
    epochs_csv = (run_dir / "epochs.csv").read_text().splitlines()
    map50 = float(epochs_csv[-1].split(",")[epochs_csv[0].split(",").index("map50")])
    assert run.data.metrics["metrics/map50"] == pytest.approx(map50, rel=1e-5)
    counts = {k: len(client.get_metric_history(run.info.run_id, k)) for k in run.data.metrics}
    print("MLflow metric counts:", json.dumps(counts, sort_keys=True), "total", sum(counts.values()))
    assert f"{sum(counts.values())} metric values" in output
    # the run folder's files, downloaded back byte for byte
    names = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"run.json", "iterations.csv", "epochs.csv", "weights"} <= names
    assert [a.path for a in client.list_artifacts(run.info.run_id, "weights")] == ["weights/best.pt"]
    got = Path(client.download_artifacts(run.info.run_id, "iterations.csv", str(tmp_path / "back")))
    assert got.read_bytes() == (run_dir / "iterations.csv").read_bytes()
    assert not server.netlog.exists() or server.netlog.read_text() == ""


def test_sweep_logs_each_run_and_the_report_to_a_sqlite_store(tiny_data, tmp_path):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'store.db'}"
    result = CliRunner().invoke(main, ["sweep", "--batch", "8,16", "--epochs", "1", "--imgsz", "64", "--data",
                                       str(tiny_data), "--project", str(tmp_path), "--name", "sw", "--mlflow", uri,
                                       "plots=False"])
    assert result.exit_code == 0, result.output + repr(result.exception)
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("detector")
    runs = {r.info.run_name: r for r in client.search_runs([experiment.experiment_id])}
    assert set(runs) == {"sw", "b8-s0", "b16-s0"}
    # Ultralytics' own MLflow callback stays off (hermetic runtime): no experiment or run of its own
    assert {e.name for e in client.search_experiments()} <= {"Default", "detector"}
    assert len(client.search_runs([e.experiment_id for e in client.search_experiments()])) == 3
    sweep_id = runs["sw"].info.run_id
    assert {a.path for a in client.list_artifacts(sweep_id)} >= {"report.html", "report.md", "sweep.json"}
    for name in ("b8-s0", "b16-s0"):
        run = runs[name]
        assert run.data.tags["mlflow.parentRunId"] == sweep_id and run.data.tags["sweep"] == "sw"
        assert run.data.params["batch.chosen"] == name[1:].split("-")[0]
        assert json.loads((tmp_path / "sw" / name / "run.json").read_text())["mlflow"]["run_id"] == run.info.run_id
    # artifacts sit beside the store, not in whatever folder the process ran in
    assert Path(experiment.artifact_location.removeprefix("file://")).parent == tmp_path / "mlartifacts"


def test_a_tracking_server_that_is_down_is_one_line_and_training_records_locally(tiny_data, tmp_path, monkeypatch):
    monkeypatch.setenv("DETECTOR_NETGUARD_LOOPBACK", "1")
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    started = time.time()
    output = train([*tiny(tiny_data, tmp_path, "down", epochs=1), "--mlflow", url])
    lines = [line for line in output.splitlines() if "MLflow" in line]
    assert len(lines) == 1 and "cannot be reached" in lines[0] and "records in" in lines[0], output
    meta = json.loads((tmp_path / "down" / "run.json").read_text())
    assert meta["status"] == "completed" and meta["mlflow"]["error"]
    assert read_csv_rows(tmp_path / "down" / "iterations.csv") == 3
    assert time.time() - started < 120


def test_mlflow_refused_up_front_without_the_package(tiny_data, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "mlflow", None)  # import mlflow raises ImportError
    monkeypatch.setitem(sys.modules, "mlflow.tracking", None)
    result = CliRunner().invoke(main, ["train", *tiny(tiny_data, tmp_path, "x"), "--mlflow", "sqlite:///m.db"])
    assert result.exit_code != 0 and "pip install 'detector[mlflow]'" in result.output
    assert not (tmp_path / "x").exists()


def test_logging_a_row_costs_the_training_thread_microseconds(tmp_path):
    """The listener only queues; the thread sends batches. Measured here: the hot-path cost per iteration."""
    uri = f"sqlite:///{tmp_path / 'bench.db'}"
    client = mlflow_log.client(uri)
    run_id = client.create_run(mlflow_log.experiment_id(client, uri)).info.run_id
    logger = mlflow_log.MlflowLogger(client, run_id, uri)
    cells = {"epoch": "1", "iteration": "0", "epoch_iteration": "1", "batch_size": "16", "images_seen": "16",
             "optimizer_step": "1", "box_loss": "3.1", "cls_loss": "4.2", "dfl_loss": "1.9", "loss": "9.2",
             "lr": "0.002", "time_s": "1.5", "iter_time_s": "0.21", "data_time_s": "0.01", "gpu_mem_gb": "",
             "grad_norm": "12.5"}
    n = 3000
    hot = 0.0
    started = time.perf_counter()
    for i in range(1, n + 1):
        row = {**cells, "iteration": str(i)}
        t = time.perf_counter()
        logger.iteration(row)
        hot += time.perf_counter() - t
    logger.close()
    total = time.perf_counter() - started
    print(f"per iteration: {hot / n * 1e6:.1f} us in the training thread, "
          f"{total / n * 1e3:.2f} ms including the background sends to SQLite")
    assert hot / n < 50e-6
    assert logger.error is None and logger.sent == n * 9
    assert len(client.get_metric_history(run_id, "iteration/loss")) == n


def test_tracking_uri_means_what_the_user_means(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert mlflow_log.tracking_uri("http://127.0.0.1:5000") == "http://127.0.0.1:5000"
    assert mlflow_log.tracking_uri("sqlite:///m.db") == "sqlite:///m.db"
    assert mlflow_log.tracking_uri("store.db") == f"sqlite:///{tmp_path / 'store.db'}"
    assert mlflow_log.tracking_uri("mlruns") == (tmp_path / "mlruns").as_uri()


def test_nothing_imports_mlflow_unless_asked():
    code = ("import sys, detector, detector.api, detector.train.run, detector.train.sweep; "
            "assert 'mlflow' not in sys.modules, 'mlflow imported'")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
