"""detector sweep --backend ray: real tiny trainings on a simulated two-node Ray cluster with fake GPUs.

The cluster is ray.cluster_utils.Cluster on this machine: a head and one worker
node, 1 CPU and 1 (fake) GPU each, so Ray runs one training per node at a time.
Ray talks to itself over loopback TCP, so these tests let loopback through the
network guard (DETECTOR_NETGUARD_LOOPBACK) and nothing else; Ray's own
processes and the trainings they start load the guard too.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path
from types import SimpleNamespace

import pytest
from click.testing import CliRunner

from detector.cli import main
from detector.train import attempts

from .conftest import NETGUARD, detector_exe, guarded_env, run_cli

pytestmark = pytest.mark.slow

# What the product sets for a Ray on loopback, plus the test's loopback allowance.
RAY_ENV = {"DETECTOR_NETGUARD_LOOPBACK": "1", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
           "RAY_USAGE_STATS_ENABLED": "0", "RAY_USAGE_STATS_REPORT_URL": "http://127.0.0.1:9/",
           "RAY_AUTH_MODE": "disabled"}
# Ray's dashboard process names the cloud it runs on by looking these up once at start; no setting prevents it.
RAY_CLOUD_PROBES = ("169.254.169.254", "metadata.google.internal")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A head and a worker node, 1 CPU and 1 fake GPU each, on loopback."""
    pytest.importorskip("ray")
    from ray.cluster_utils import Cluster

    netlog = tmp_path_factory.mktemp("ray-netlog") / "netlog.txt"
    with pytest.MonkeyPatch.context() as mp:
        for key, value in RAY_ENV.items():
            mp.setenv(key, value)
        mp.setenv("PYTHONPATH", os.pathsep.join([str(NETGUARD), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
        mp.setenv("DETECTOR_NETLOG", str(netlog))
        node = {"num_cpus": 1, "num_gpus": 1, "node_ip_address": "127.0.0.1"}
        c = Cluster(initialize_head=True, head_node_args={**node, "include_dashboard": False})
        worker = c.add_node(**node)
        c.wait_for_nodes()
        try:
            yield SimpleNamespace(cluster=c, address=c.address, head=c.head_node.node_id, worker=worker,
                                  netlog=netlog)
        finally:
            c.shutdown()


def sweep_args(cluster, tiny_data: Path, project: Path, name: str, batches: str, seeds: str, epochs: int) -> list:
    return ["sweep", "--backend", "ray", "--address", cluster.address, "--batch", batches, "--seeds", seeds,
            "--epochs", str(epochs), "--imgsz", "64", "--data", str(tiny_data), "--workers", "0",
            "--project", str(project), "--name", name, "plots=False"]


def meta(run_dir: Path) -> dict:
    return json.loads((run_dir / "run.json").read_text())


def epoch_seconds(iso: str) -> float:
    return datetime.fromisoformat(iso).timestamp()


def assert_no_leftovers(folder: Path) -> None:
    assert not (folder / attempts.ATTEMPTS).exists(), sorted(p.name for p in (folder / attempts.ATTEMPTS).rglob("*"))
    assert not (folder / attempts.STORAGE_PROBE).exists()


def assert_only_cloud_probes(netlog: Path) -> None:
    lines = netlog.read_text().splitlines() if netlog.exists() else []
    assert all(any(host in line for host in RAY_CLOUD_PROBES) for line in lines), lines


@pytest.fixture(scope="module")
def ray_sweep(cluster, tiny_data, tmp_path_factory):
    """2 batches x 2 seeds, 2 epochs each, on the two nodes, as a user runs it."""
    project = tmp_path_factory.mktemp("ray-sweeps")
    args = sweep_args(cluster, tiny_data, project, "rs", "8,16", "0,1", 2)
    started = time.time()
    result = run_cli(args, project)
    wall = time.time() - started
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    print(f"\n2-node Ray sweep of 4 runs: {wall:.1f} s wall")
    more = [*args[:args.index("--seeds") + 1], "0,1,2", *args[args.index("--seeds") + 2:]]  # adds b8-s2, b16-s2
    return project / "rs", more, result


def test_two_node_sweep_trains_every_run_once_per_node_and_reports(ray_sweep, cluster):
    folder, _, result = ray_sweep
    runs = {f"b{b}-s{s}": meta(folder / f"b{b}-s{s}") for b in (8, 16) for s in (0, 1)}
    for name, m in runs.items():
        assert m["status"] == "completed" and m["batch"]["used"] == int(name[1:].split("-")[0]), name
        assert m["config"]["sweep"]["sweep"] == "rs" and m["config"]["project"] == str(folder)
        assert (folder / name / attempts.LOG).is_file() and (folder / name / "weights" / "best.pt").is_file()
    assert {m["placement"]["node"] for m in runs.values()} == {cluster.head, cluster.worker.node_id}
    spans = [(epoch_seconds(m["started"]), epoch_seconds(m["finished"])) for m in runs.values()]
    at_once = max(sum(s <= t < f for s, f in spans) for t, _ in spans)
    assert at_once == 2  # one per node: the two fake GPUs, never more
    for f in ("report.html", "report.md", "sweep.json"):
        assert (folder / f).is_file(), f
    assert "| batch used | 8 | 8 | 16 | 16 |" in (folder / "report.md").read_text()
    assert "Ray: 2 node(s) see" in result.stdout and "4 done, 0 running, 0 queued, 0 failed" in result.stdout
    assert re.search(r"\d done, 2 running \(b\d+-s\d epoch [12]/2, b\d+-s\d epoch [12]/2\)", result.stdout)
    assert_no_leftovers(folder)
    assert_only_cloud_probes(cluster.netlog)
    assert not (folder.parent / "netlog.txt").exists()  # the driver itself tried nothing beyond loopback


def test_ctrl_c_cancels_the_runs_and_marks_them_interrupted(ray_sweep, tmp_path):
    folder, more, _ = ray_sweep
    driver = subprocess.Popen([detector_exe(), *more], env=guarded_env(tmp_path), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, start_new_session=True)
    wait_for(lambda: len(running_attempts(folder)) == 2 or None, driver)
    driver.send_signal(signal.SIGINT)  # what Ctrl-C sends the driver
    out, err = driver.communicate(timeout=120)
    assert driver.returncode == 130, out[-2000:] + err[-2000:]
    assert "sweep interrupted; 2 run(s) stopped and marked interrupted (b16-s2, b8-s2)" in err
    assert [meta(r)["status"] for r in running_attempts(folder)] == ["interrupted", "interrupted"]
    assert not (folder / "b8-s2").exists() and not (folder / "b16-s2").exists()  # nothing half done in place


def test_rerun_trains_only_what_is_missing_and_survives_a_lost_node(ray_sweep, cluster, tmp_path):
    """Last in this file: the worker node stays dead."""
    folder, more, _ = ray_sweep
    kept = {n: (folder / n / "run.json").read_text() for n in ("b8-s0", "b8-s1", "b16-s0", "b16-s1")}
    since = time.time()
    driver = subprocess.Popen([detector_exe(), *more], env=guarded_env(tmp_path), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, start_new_session=True)
    on_worker = wait_for(lambda: [r for r in running_attempts(folder, node=cluster.worker.node_id, since=since)
                                  if (r / "weights" / "last.pt").is_file()], driver)[0]  # its epoch 1 is saved
    killed = time.time()
    cluster.cluster.remove_node(cluster.worker)
    out, err = driver.communicate(timeout=300)
    assert driver.returncode == 0, out[-3000:] + err[-3000:]
    assert all(f"{n}: already completed, skipped" in out for n in kept) and "2 run(s) to train" in out
    assert {n: (folder / n / "run.json").read_text() for n in kept} == kept
    m = meta(folder / on_worker.name)
    assert m["status"] == "completed" and m["placement"]["node"] == cluster.head
    assert m["placement"]["continued_from"]  # from the lost attempt's epoch 1, in a copy
    epochs = [int(x.split(",")[0]) for x in (folder / on_worker.name / "epochs.csv").read_text().splitlines()[1:]]
    assert epochs == [1, 2]
    other = "b16-s2" if on_worker.name == "b8-s2" else "b8-s2"
    assert meta(folder / other)["status"] == "completed"
    assert "| batch used | 8 | 8 | 8 | 16 | 16 | 16 |" in (folder / "report.md").read_text()
    assert_no_leftovers(folder)
    print(f"\nnode killed -> its run finished on the head: {epoch_seconds(m['finished']) - killed:.1f} s")


def running_attempts(folder: Path, node: str | None = None, since: float = 0) -> list[Path]:
    """Run folders of the attempts that have a run.json (optionally on one node, started since)."""
    out = []
    for info in sorted((folder / attempts.ATTEMPTS).glob(f"*/*/{attempts.ATTEMPT_JSON}")):
        try:
            attempt = json.loads(info.read_text())
        except (OSError, ValueError):
            continue
        run_dir = info.parent / info.parent.parent.name
        if (node is None or attempt["node"] == node) and attempt["started"] >= since and (run_dir / "run.json").is_file():
            out.append(run_dir)
    return out


def wait_for(condition, driver: subprocess.Popen, timeout: float = 240):
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert driver.poll() is None, driver.communicate()
        if found := condition():
            return found
        time.sleep(0.2)
    driver.kill()
    raise AssertionError(f"not reached within {timeout} s: {driver.communicate()}")


# ---- without a cluster -----------------------------------------------------------------------------------------

def test_storage_probe_says_what_a_node_cannot_see(tmp_path):
    probe = tmp_path / attempts.STORAGE_PROBE
    probe.mkdir()
    (probe / "driver").write_text("token")
    assert attempts.probe_storage(str(probe), "token", "node-a", None) is None
    assert (probe / "node-a").read_text() == "token"  # the marker the driver reads back
    assert "does not see" in attempts.probe_storage(str(probe), "another-token", "node-b", None)
    assert "dataset" in attempts.probe_storage(str(probe), "token", "node-c", str(tmp_path / "missing.yaml"))


def test_a_new_attempt_continues_the_furthest_earlier_one(tmp_path):
    def attempt(where: Path, status: str, epochs: int, last: bool) -> Path:
        (where / "weights").mkdir(parents=True)
        (where / "run.json").write_text(json.dumps({"status": status}))
        (where / "epochs.csv").write_text("epoch\n" + "".join(f"{e}\n" for e in range(1, epochs + 1)))
        if last:
            (where / "weights" / "last.pt").write_bytes(b"x")
        return where

    tries = tmp_path / attempts.ATTEMPTS / "b8-s0"
    attempt(tmp_path / "b8-s0", "interrupted", 0, last=False)  # an earlier sweep's run, stopped in epoch 1
    attempt(tries / "a" / "b8-s0", "interrupted", 1, last=True)
    furthest = attempt(tries / "b" / "b8-s0", "running", 2, last=True)  # its node was lost
    assert attempts.continue_from(tmp_path, "b8-s0") == furthest
    assert attempts.continue_from(tmp_path, "b8-s0", exclude=tries / "b") == tries / "a" / "b8-s0"
    finished = attempt(tries / "c" / "b8-s0", "completed", 2, last=True)  # its task was lost before the rename
    assert attempts.continue_from(tmp_path, "b8-s0") == finished


def test_each_task_gets_the_train_options_of_its_run(tmp_path):
    from detector.config import TrainConfig, parse_overrides
    from detector.train import sweep, sweep_ray

    config = sweep.SweepConfig(batches=(8, 16), seeds=(0, 1), semantics="true", name="x", template=TrainConfig(
        data=Path("rel/data.yaml"), epochs=3, overrides={"optimizer": "SGD", "lr0": 0.01, "mosaic": 0.0,
                                                         "close_mosaic": 0, "cache": "disk"}))
    p = sweep.plan(config)[3]  # b16-s1
    spec = sweep_ray.spec_for(config, tmp_path, p, gpus=0)
    args = list(spec.args)
    assert (spec.name, spec.device, spec.sweep["lr_scaling"]) == ("b16-s1", "cpu", "linear")
    assert args[args.index("--batch") + 1] == "16" and args[args.index("--seed") + 1] == "1"
    assert args[args.index("--data") + 1] == "rel/data.yaml"  # not here: left as given
    keyvalues = [a for a in args if "=" in a]
    assert parse_overrides(tuple(keyvalues)) == {**config.template.overrides, **p.overrides}  # read back exactly
    assert "--device" not in sweep_ray.spec_for(config, tmp_path, p, gpus=1).args  # Ray picks the GPU


def test_missing_ray_says_how_to_install_it(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray raises ImportError
    result = CliRunner().invoke(main, ["sweep", "--backend", "ray", "--batch", "8", "--project", str(tmp_path)])
    assert result.exit_code == 2
    assert result.output.strip() == "Error: --backend ray needs Ray: pip install 'detector[ray]' (Ray 2.60.0)"
    assert list(tmp_path.iterdir()) == []


def test_an_address_nothing_answers_at_is_refused_at_once(monkeypatch, tmp_path):
    pytest.importorskip("ray")
    for key, value in RAY_ENV.items():  # set here so the test leaves the environment as it found it
        monkeypatch.setenv(key, value)
    with socket.socket() as s:  # a loopback port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    result = CliRunner().invoke(main, ["sweep", "--backend", "ray", "--address", f"127.0.0.1:{port}", "--batch", "8",
                                       "--project", str(tmp_path)])
    assert result.exit_code == 1 and result.output.count("\n") == 1
    assert f"no Ray cluster answers at 127.0.0.1:{port} (Connection refused)" in result.output
    assert list(tmp_path.iterdir()) == []


def test_ray_options_need_the_ray_backend(tmp_path):
    result = CliRunner().invoke(main, ["sweep", "--batch", "8", "--gpus-per-run", "1", "--project", str(tmp_path)])
    assert result.exit_code == 2 and "--gpus-per-run applies to --backend ray only" in result.output


def test_local_backend_never_imports_ray(tiny_data, tmp_path):
    code = ("import sys\nfrom detector.cli import main\n"
            "try:\n    main(sys.argv[1:], standalone_mode=False)\n"
            "finally:\n    print('RAY IMPORTED' if 'ray' in sys.modules else 'ray not imported')\n")
    args = ["sweep", "--batch", "8", "--epochs", "1", "--imgsz", "64", "--data", str(tiny_data), "--workers", "0",
            "--project", str(tmp_path), "plots=False"]
    result = subprocess.run([sys.executable, "-c", code, *args], env=guarded_env(tmp_path), capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "ray not imported" in result.stdout and meta(tmp_path / "sweep-b8" / "b8-s0")["status"] == "completed"
