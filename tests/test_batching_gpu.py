"""--batch auto on a real GPU: the probe, a training at the chosen batch, a real mid-training step-down.

Skipped without CUDA. Run on a GPU machine with `pytest -m gpu tests/test_batching_gpu.py -s`
(-s shows the predicted and measured peaks the benchmark doc quotes).
"""

from __future__ import annotations

import csv
import json
import threading
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from detector.cli import main

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(),
                       reason="needs a CUDA device: the probe measures GPU memory and the step-down needs a real "
                              "out-of-memory error (CPU coverage: tests/test_batching.py)"),
]

IMGSZ = 640  # large enough that batch size dominates memory


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def gpu_data(tmp_path_factory) -> Path:
    """128 training images, so batch 64 is a full batch (the images are small; Ultralytics scales them up)."""
    from detector.data import synth

    out = tmp_path_factory.mktemp("gpu-data") / "shapes"
    return synth.generate(synth.SynthSpec(train_images=128, val_images=32, imgsz=64, seed=5), out)


def _train(data: Path, project: Path, name: str, *args: str):
    result = CliRunner().invoke(main, ["train", "--data", str(data), "--imgsz", str(IMGSZ), "--device", "0",
                                       "--workers", "2", "--project", str(project), "--name", name, "plots=False",
                                       *args])
    assert result.exit_code == 0, result.output + repr(result.exception)
    return project / name, result.output


def test_probe_measures_every_fitting_candidate_and_leaves_nothing_behind():
    from detector.yolo import probe

    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated(0)
    started = time.perf_counter()
    ms = probe.probe_batch_memory("yolo11n.yaml", 3, IMGSZ, (16, 32, 64), 0, train_labels=40, val_labels=10)
    seconds = time.perf_counter() - started
    print(f"\nprobe yolo11n imgsz {IMGSZ}: {seconds:.1f} s; " + "; ".join(
        f"{m['batch']}: train {m['train_peak_gb']}, val {m['val_peak_gb']}, oom {m['oom']}" for m in ms))
    fitted = [m for m in ms if not m["oom"]]
    assert fitted and all(m["train_peak_gb"] > 0 and m["val_peak_gb"] > 0 for m in fitted)
    peaks = [m.peak_gb for m in fitted]
    assert peaks == sorted(peaks), "memory should grow with the batch"
    torch.cuda.synchronize()
    # The probe's model, optimizer and batches are gone; only PyTorch's cached cuBLAS workspaces may stay.
    assert torch.cuda.memory_allocated(0) - before <= 64 * 2**20


def test_train_auto_probes_records_the_table_and_stays_under_the_budget(gpu_data, tmp_path):
    run, output = _train(gpu_data, tmp_path, "auto", "--epochs", "2")
    assert "probe:" in output
    batch = json.loads((run / "run.json").read_text())["batch"]
    assert batch["requested"] == "auto" and batch["chosen"] in (16, 32, 64)
    assert batch["used"] == batch["chosen"]
    assert batch["probe"]["seconds"] > 0 and batch["probe"]["budget_gb"] > 0
    chosen = next(r for r in batch["table"] if r["batch"] == batch["chosen"])
    assert chosen["fits"] and chosen["peak_gb"] > 0
    actual = max(float(r["peak_gpu_mem_gb"]) for r in read_csv(run / "epochs.csv"))
    print(f"\npredicted peak {chosen['peak_gb']:.2f} GB at batch {batch['chosen']}, measured over the run "
          f"{actual:.2f} GB, budget {batch['probe']['budget_gb']:.2f} GB")
    assert actual <= batch["probe"]["budget_gb"]


def _shrink_memory_after_first_epoch(run: Path, limit_gb: float, done: threading.Event) -> None:
    """Like another process taking memory mid-run: once epoch 1 is recorded, cap this process at limit_gb."""
    total = torch.cuda.get_device_properties(0).total_memory / 2**30
    while not done.is_set():
        try:
            progress = json.loads((run / "run.json").read_text()).get("progress") or {}
        except (OSError, ValueError):
            progress = {}
        if progress.get("epochs_completed", 0) >= 1:
            torch.cuda.set_per_process_memory_fraction(limit_gb / total, 0)
            torch.cuda.empty_cache()  # cached blocks above the cap go back, so the next large step must allocate
            return
        time.sleep(0.05)


def test_real_out_of_memory_in_a_later_epoch_steps_down(gpu_data, tmp_path):
    from detector.yolo import probe

    ms = {m["batch"]: m for m in probe.probe_batch_memory("yolo11n.yaml", 3, IMGSZ, (32, 64), 0, 40, 10)}
    if 64 not in ms or ms[64].oom:
        pytest.skip("batch 64 does not fit this GPU at all; the test needs 64 to fit at first")
    limit = (ms[32].peak_gb + ms[64].peak_gb) / 2  # 32 fits under it, 64 does not
    run = tmp_path / "shrink"
    done = threading.Event()
    watcher = threading.Thread(target=_shrink_memory_after_first_epoch, args=(run, limit, done), daemon=True)
    watcher.start()
    try:
        run, output = _train(gpu_data, tmp_path, "shrink", "--epochs", "4", "--batch", "auto",
                             "--batch-candidates", "32,64")
    finally:
        done.set()
        watcher.join()
        torch.cuda.set_per_process_memory_fraction(1.0, 0)
    record = json.loads((run / "run.json").read_text())
    steps = [e for e in record["events"] if e["type"] == "oom_step_down"]
    assert steps and (steps[0]["from"], steps[0]["to"]) == (64, 32) and steps[0]["epoch"] >= 2, output
    assert record["batch"]["used"] == 32
    rows = read_csv(run / "iterations.csv")
    assert [int(r["iteration"]) for r in rows] == list(range(1, len(rows) + 1))
    assert [int(r["epoch"]) for r in read_csv(run / "epochs.csv")] == [1, 2, 3, 4]
