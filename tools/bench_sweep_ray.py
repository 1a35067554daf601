"""Benchmark: the same sweep on the local backend and on a simulated two-node Ray cluster.

Generates the tests' tiny dataset (40 train / 16 val images at 64 px), then runs
`detector sweep --batch 8,16 --seeds 0,1 --epochs E --imgsz 64` twice, as a user
would: `--backend local`, and `--backend ray --address` a ray.cluster_utils.Cluster
of two nodes with 1 CPU and 1 fake GPU each (so one run per node at a time). Both
wall times include everything the command does (cluster start is timed apart).

    python tools/bench_sweep_ray.py                 # 1 epoch per run
    python tools/bench_sweep_ray.py --epochs 3
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

LOOPBACK_RAY = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0",
                "RAY_USAGE_STATS_REPORT_URL": "http://127.0.0.1:9/", "RAY_AUTH_MODE": "disabled"}


def sweep(backend: list[str], data: Path, project: Path, epochs: int) -> float:
    cmd = [str(Path(sys.executable).with_name("detector")), "sweep", "--batch", "8,16", "--seeds", "0,1",
           "--epochs", str(epochs), "--imgsz", "64", "--data", str(data), "--workers", "0",
           "--project", str(project), "--name", "bench", "plots=False", *backend]
    started = time.time()
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode:
        raise SystemExit(result.stdout[-2000:] + result.stderr[-2000:])
    return time.time() - started


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=1)
    args = ap.parse_args()
    os.environ.update(LOOPBACK_RAY)
    from ray.cluster_utils import Cluster

    from detector.data import synth

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        os.environ["DETECTOR_HOME"] = str(tmp / "home")
        data = synth.generate(synth.SynthSpec(train_images=40, val_images=16, imgsz=64, seed=3), tmp / "shapes")
        local = sweep([], data, tmp / "local", args.epochs)
        print(f"local backend: 4 runs in {local:.1f} s", flush=True)
        started = time.time()
        node = {"num_cpus": 1, "num_gpus": 1, "node_ip_address": "127.0.0.1"}
        cluster = Cluster(initialize_head=True, head_node_args={**node, "include_dashboard": False})
        cluster.add_node(**node)
        cluster.wait_for_nodes()
        print(f"2-node cluster up in {time.time() - started:.1f} s", flush=True)
        try:
            ray = sweep(["--backend", "ray", "--address", cluster.address], data, tmp / "ray", args.epochs)
        finally:
            cluster.shutdown()
        print(f"ray backend, 2 nodes: 4 runs in {ray:.1f} s ({local / ray:.2f}x the local speed)")


if __name__ == "__main__":
    main()
