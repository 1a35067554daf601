"""detector compare and detector sweep: reading runs back, the report's words and numbers, the HTML in a browser.

Edge cases use run folders written through the real Recorder (no training
needed to have a run that is still running, has no rows, or records other loss
terms); the end-to-end path is one real tiny sweep on CPU.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from detector.report import analysis
from detector.report import render as report
from detector.record import runs
from detector.train import sweep
from detector.errors import RunDirError, UsageError
from detector.record.writer import Recorder
from detector.config import TrainConfig
from tests.conftest import run_cli

LOSSES = ["box_loss", "cls_loss", "dfl_loss"]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def write_run(root: Path, name: str, batch: int = 16, losses=LOSSES, epochs: int = 2, iters: int = 3,
              status: str = "completed", seed: int = 0, imgsz: int = 64, fingerprint: str = "fp1",
              map_top: float = 0.3, nbs: int = 64, lr0: float = 0.01) -> Path:
    """A run folder written through the real Recorder, with deterministic made-up values."""
    run_dir = root / name
    run_dir.mkdir(parents=True)
    rec = Recorder(run_dir)
    rec.start({"name": name, "model": "yolo11n.yaml", "device": {"type": "cpu", "name": "cpu"},
               "config": {"seed": seed, "ultralytics": {"imgsz": imgsz, "epochs": 2, "batch": batch, "seed": seed}},
               "dataset": {"fingerprint": fingerprint}, "batch": {"requested": str(batch), "chosen": batch},
               "nbs": nbs, "accumulate": max(round(nbs / batch), 1), "optimizer": "SGD", "lr0": lr0,
               "iterations_per_epoch": iters})
    it = 0
    for e in range(1, epochs + 1):
        for k in range(1, iters + 1):
            it += 1
            row = {t: 2.0 / it + j for j, t in enumerate(losses)}
            rec.iteration(losses, {**row, "epoch": e, "iteration": it, "epoch_iteration": k, "batch_size": batch,
                                   "images_seen": it * batch, "optimizer_step": it // 2, "loss": sum(row.values()),
                                   "lr": 0.01, "time_s": it * 0.5, "iter_time_s": 0.5, "data_time_s": 0.01})
        m = map_top * e / epochs
        rec.epoch(losses, {**{f"train_{t}": 1.0 / e for t in losses}, **{f"val_{t}": 1.5 / e for t in losses},
                           "epoch": e, "precision": 0.5, "recall": 0.4, "map50": m * 1.5, "map50_95": m,
                           "lr": 0.01, "epoch_time_s": iters * 0.5 + 0.2, "images_per_s": 2 * batch})
    if status == "running":
        rec.close()  # a live run: run.json still says running
    else:
        rec.finish(status, **({"batch": {"requested": str(batch), "chosen": batch, "used": batch}}
                              if status == "completed" else {}))
    return run_dir


def read_md(out: Path) -> str:
    return (out / "report.md").read_text(encoding="utf-8")


# ---- reading runs --------------------------------------------------------------------------------------------

def test_not_a_run_folder_is_a_clear_error(tmp_path):
    plain = tmp_path / "holiday-photos"
    plain.mkdir()
    (plain / "a.txt").write_text("x")
    with pytest.raises(RunDirError, match="not a detector run"):
        runs.load(plain)
    result = run_cli(["compare", str(plain), "--out", str(tmp_path / "out")], tmp_path)
    assert result.returncode != 0
    assert "not a detector run (no run.json)" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "out" / "report.html").exists()
    result = run_cli(["compare", str(tmp_path / "missing")], tmp_path)
    assert result.returncode != 0 and "missing is not a folder" in result.stderr


def test_truncated_last_line_is_dropped_and_marked(tmp_path):
    run_dir = write_run(tmp_path, "cut", status="running")
    with open(run_dir / "iterations.csv", "a", encoding="utf-8") as f:
        f.write("3,7,1,16,11")  # a row the writer did not finish
    run = runs.load(run_dir)
    assert len(run.iterations) == 6 and run.iterations.truncated
    assert any("incomplete last CSV row" in n for n in run.notes)
    assert any("still running" in n for n in run.notes)


def test_ema_is_debiased_and_skips_gaps():
    import numpy as np

    smooth = runs.ema(np.array([10.0, np.nan, 10.0, 0.0]), weight=0.5)
    assert smooth[0] == pytest.approx(10.0)  # not pulled towards 0 at the start
    assert np.isnan(smooth[1])
    assert smooth[2] == pytest.approx(10.0)
    assert smooth[3] == pytest.approx(3.75 / 0.875)  # (0.5*7.5 + 0.5*0) / (1 - 0.5**3)


def test_running_and_empty_runs_are_reported_as_far_as_they_go(tmp_path):
    done = write_run(tmp_path, "b16", batch=16)
    live = write_run(tmp_path, "b32", batch=32, epochs=1, status="running")
    empty = write_run(tmp_path, "b64", batch=64, epochs=0, status="running")
    out = tmp_path / "out"
    html = report.compare([done, live, empty], out)
    md = read_md(out)
    assert "Runs that are not complete" in md
    assert re.search(r"\*\*b32\*\*: still running", md)
    assert re.search(r"\*\*b64\*\*: still running.*no training iterations recorded yet", md)
    assert "| epochs (done / planned) | 2 / 2 | 1 / 2 | 0 / 2 |" in md
    assert "| status | completed | running | running |" in md
    assert html.is_file() and (out / "plots" / "loss_vs_images.png").is_file()
    from detector.report import plots

    assert plots.label(runs.load(live)) == "b32 (running)"  # what the plots' legends show


def test_differing_loss_columns_compare_what_they_share(tmp_path):
    a = write_run(tmp_path, "yolo", losses=LOSSES)
    b = write_run(tmp_path, "other", losses=["box_loss", "cls_loss", "dfl_loss", "seg_loss"])
    comp = report.analyse(report.load_runs([a, b]))
    assert any("other also has seg_loss" in n and "box_loss, cls_loss, dfl_loss" in n for n in comp.notes)
    # Final losses sum the shared terms only, so the two runs are comparable.
    assert comp.rows[0]["final_val_loss"] == pytest.approx(comp.rows[1]["final_val_loss"])
    report.compare([a, b], tmp_path / "out")
    assert "seg_loss" in read_md(tmp_path / "out")


def test_runs_that_differ_in_more_than_batch_are_warned_about(tmp_path):
    a = write_run(tmp_path, "b16", batch=16)
    b = write_run(tmp_path, "b32", batch=32, imgsz=96, fingerprint="fp2", seed=1)
    report.compare([a, b], tmp_path / "out")
    md = read_md(tmp_path / "out")
    assert "Warning: the runs differ in more than batch size" in md
    assert "The dataset (fingerprint) differs (b16: fp1; b32: fp2)" in md
    assert "imgsz differs (b16: 64; b32: 96)" in md
    assert "seeds differ between batch sizes" in md
    c = write_run(tmp_path / "same", "b32", batch=32)
    report.compare([a, c], tmp_path / "out2")
    md2 = read_md(tmp_path / "out2")
    assert "Warning" not in md2
    assert "Same images per weight update" in md2 and "every optimizer step saw 64 images" in md2


def test_true_batch_sizes_are_named_as_such(tmp_path):
    a = write_run(tmp_path, "b16", batch=16, nbs=16, lr0=0.0025)
    b = write_run(tmp_path, "b64", batch=64, nbs=64, lr0=0.01)
    comp = report.analyse(report.load_runs([a, b]))
    assert comp.kind.name == "true" and "every iteration is a weight update" in comp.kind.text
    assert any("learning rate lr0 differs" in w for w in comp.warnings)  # no recorded rule explains it


# ---- seeds: intervals and the noise verdict --------------------------------------------------------------------

def _rows(groups: dict) -> list[dict]:
    return [{"batch_used": b, "status": "completed", "best_map50_95": v} for b, vals in groups.items() for v in vals]


def test_t_interval_matches_the_textbook():
    [s] = analysis.group_stats(_rows({16: [0.4, 0.5, 0.6]}), "best_map50_95")
    assert (s.n, s.mean) == (3, pytest.approx(0.5))
    assert s.half_width == pytest.approx(4.303 * 0.1 / 3 ** 0.5, rel=1e-3)


def test_noise_verdict_says_within_noise_or_not():
    noisy = analysis.group_stats(_rows({16: [0.40, 0.50, 0.60], 64: [0.45, 0.55, 0.50]}), "best_map50_95")
    assert "within the noise" in analysis.noise_verdict(noisy, "Best mAP50-95")
    clear = analysis.group_stats(_rows({16: [0.40, 0.41, 0.40], 64: [0.60, 0.61, 0.60]}), "best_map50_95")
    verdict = analysis.noise_verdict(clear, "Best mAP50-95")
    assert "do not overlap" in verdict and "batch 16" in verdict and "within the noise" not in verdict


def test_paired_by_seed_finds_what_unpaired_intervals_hide():
    # Seeds move both batch sizes together; batch 64 is 0.03 lower for every seed.
    rows = [{"batch_used": b, "status": "completed", "seed": s, "final_map50_95": base - (0.03 if b == 64 else 0)}
            for s, base in enumerate([0.30, 0.40, 0.50]) for b in (16, 64)]
    unpaired = analysis.noise_verdict(analysis.group_stats(rows, "final_map50_95"), "Final mAP50-95")
    assert "within the noise" in unpaired
    (paired,) = analysis.paired_verdicts(rows, "final_map50_95", "Final mAP50-95")
    assert "batch 64 minus batch 16 = -0.030" in paired and "lower beyond the seed noise" in paired
    rows[1]["final_map50_95"] = 0.33  # seed 0 now favours batch 64: the paired interval includes 0
    (paired,) = analysis.paired_verdicts(rows, "final_map50_95", "Final mAP50-95")
    assert "within the noise" in paired


def test_report_with_seeds_shows_intervals(tmp_path):
    dirs = [write_run(tmp_path, f"b{b}-s{s}", batch=b, seed=s, map_top=0.3 + 0.01 * s)
            for b in (16, 32) for s in (0, 1)]
    report.compare(dirs, tmp_path / "out")
    md = read_md(tmp_path / "out")
    assert "Seeds: mean and 95% confidence interval" in md
    assert "Seeds 0, 1 were run for every batch size" in md
    assert "within the noise" in md  # both batch sizes have identical made-up values per seed
    assert "Warning" not in md


# ---- sweep planning (pure) -----------------------------------------------------------------------------------

def test_true_semantics_scales_lr_by_the_stated_rule(tmp_path):
    def planned(**over):
        cfg = sweep.SweepConfig(batches=(16, 32, 64), semantics="true", name="x",
                                template=TrainConfig(data=tmp_path / "d.yaml", overrides=over))
        return {p.batch: p for p in sweep.plan(cfg)}

    sgd = planned(optimizer="SGD", lr0=0.01)
    assert [sgd[b].overrides["lr0"] for b in (16, 32, 64)] == pytest.approx([0.0025, 0.005, 0.01])
    assert sgd[16].overrides["nbs"] == 16 and sgd[16].record["lr_scaling"] == "linear"
    adam = planned(optimizer="AdamW", lr0=0.004)
    assert adam[16].overrides["lr0"] == pytest.approx(0.002) and adam[16].record["lr_scaling"] == "sqrt"
    with pytest.raises(UsageError, match="optimizer 'auto'"):
        planned()
    acc = sweep.plan(sweep.SweepConfig(batches=(16, 64), name="y", template=TrainConfig()))
    assert [p.overrides for p in acc] == [{"nbs": 64}, {"nbs": 64}]  # the built-in demo's nbs=16 is not used
    with pytest.raises(UsageError, match="lr-scaling applies to --semantics true"):
        sweep.plan(sweep.SweepConfig(batches=(16,), template=TrainConfig(), lr_scaling="linear"))
    with pytest.raises(UsageError, match="twice"):
        sweep.parse_ints("16,16", "--batch", minimum=1)


# ---- the real thing: a tiny sweep, compare with tiny_run, the HTML in Chromium ---------------------------------

@pytest.fixture(scope="module")
def tiny_sweep(tiny_data, tmp_path_factory):
    """`detector sweep --batch 8,16 --epochs 1 --imgsz 64` on the tiny dataset, as a user runs it."""
    project = tmp_path_factory.mktemp("sweeps")
    args = ["sweep", "--batch", "8,16", "--epochs", "1", "--imgsz", "64", "--data", str(tiny_data), "--workers", "0",
            "--project", str(project), "--name", "bs", "plots=False"]
    result = run_cli(args, project)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return project / "bs", args, result


def test_sweep_trains_each_batch_and_writes_the_report(tiny_sweep):
    folder, _, result = tiny_sweep
    # 1 epoch of 40 images: Ultralytics caps accumulate at the run's iterations (5 at batch 8, 3 at batch 16).
    for b, acc in ((8, 5), (16, 3)):
        meta = json.loads((folder / f"b{b}-s0" / "run.json").read_text())
        assert meta["status"] == "completed" and meta["batch"]["used"] == b
        assert (meta["nbs"], meta["accumulate"]) == (64, acc)
        assert meta["config"]["sweep"]["semantics"] == "accumulate" and meta["config"]["sweep"]["sweep"] == "bs"
    for f in ("report.html", "report.md", "sweep.json", "plots/map_vs_epoch.png", "plots/speed_memory.png"):
        assert (folder / f).is_file(), f
    md = read_md(folder)
    assert "| batch used | 8 | 16 |" in md and "| nbs (nominal batch) | 64 | 64 |" in md
    assert "| images per optimizer step | 40 | 48 |" in md
    assert "Mixed: the runs differ in images per weight update" in md and "capped accumulate" in md
    assert "Warning" not in md
    assert "Report:" in result.stdout


def test_sweep_rerun_skips_finished_and_restarts_unfinished(tiny_sweep):
    folder, args, _ = tiny_sweep
    started = time.time()
    again = run_cli(args, folder)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "b8-s0: already completed, skipped" in again.stdout and "b16-s0: already completed, skipped" in again.stdout
    assert time.time() - started < 60
    # b16-s0 killed before its first epoch ended: no weights, run.json still 'running'.
    run_dir = folder / "b16-s0"
    shutil.rmtree(run_dir / "weights")
    meta = json.loads((run_dir / "run.json").read_text())
    (run_dir / "run.json").write_text(json.dumps({**meta, "status": "running"}))
    third = run_cli(args, folder)
    assert third.returncode == 0, third.stderr[-2000:]
    assert "b8-s0: already completed" in third.stdout and "b16-s0: stopped before its first epoch ended" in third.stdout
    assert json.loads((run_dir / "run.json").read_text())["status"] == "completed"
    changed = run_cli([*args[:-1], "mosaic=0"], folder)
    assert changed.returncode != 0 and "was started with other settings (overrides differ)" in changed.stderr


def test_true_semantics_sweep_makes_every_iteration_a_step(tiny_data, tmp_path):
    result = run_cli(["sweep", "--batch", "8", "--semantics", "true", "--epochs", "1", "--imgsz", "64",
                      "--workers", "0", "--data", str(tiny_data), "--project", str(tmp_path), "optimizer=SGD", "lr0=0.01", "plots=False"],
                     tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    meta = json.loads((tmp_path / "sweep-b8-true" / "b8-s0" / "run.json").read_text())
    assert (meta["nbs"], meta["accumulate"], meta["optimizer"]) == (8, 1, "SGD")
    assert meta["lr0"] == pytest.approx(0.01 * 8 / 64)  # what the optimizer really started from
    assert meta["config"]["sweep"]["lr_scaling"] == "linear" and meta["config"]["sweep"]["base_lr0"] == 0.01
    steps = runs.steps_per_epoch(runs.load(tmp_path / "sweep-b8-true" / "b8-s0"))
    assert steps == {1: 5}  # 40 images / batch 8: five iterations, five weight updates


def _chromium(args: list[str], tmp: Path) -> subprocess.CompletedProcess:
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={tmp / 'chromium-profile'}", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=180)


def test_compare_real_runs_and_render_in_chromium(tiny_run, tiny_sweep, tmp_path):
    folder, _, _ = tiny_sweep
    out = tmp_path / "cmp"
    result = run_cli(["compare", str(tiny_run), str(folder / "b8-s0"), "--out", str(out)], tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    html = (out / "report.html").read_text(encoding="utf-8")
    md = read_md(out)
    assert "| batch used | 16 | 8 |" in md
    assert "epochs differs" in md  # tiny_run trained 2 epochs, the sweep 1: the report must say so
    pngs = sorted((out / "plots").glob("*.png"))
    imgs = re.findall(r'<img [^>]*src="([^"]+)"', html)
    assert len(pngs) >= 7 and len(imgs) == len(pngs)
    assert all(src.startswith("data:image/png;base64,") for src in imgs)
    assert not re.search(r'(src|href)="(https?:)?//', html) and "@import" not in html  # nothing fetched
    if CHROMIUM is None:
        pytest.skip("chromium is not installed (apt-get install chromium); the HTML was checked without a browser")
    shot = tmp_path / "report.png"
    shown = _chromium(["--enable-logging=stderr", "--v=0", f"--screenshot={shot}", "--window-size=1400,3000",
                       (out / "report.html").as_uri()], tmp_path)
    assert shown.returncode == 0 and shot.stat().st_size > 50_000, shown.stderr[-2000:]
    console = [line for line in shown.stderr.splitlines() if ":CONSOLE" in line or "Uncaught" in line]
    assert console == []
    # The test's own copy gets a probe that counts images the browser decoded; the report itself has no script.
    probe = tmp_path / "probe.html"
    probe.write_text(html.replace("</body>", '<script>addEventListener("load",()=>{const i=[...document.images];'
                                  'document.body.dataset.decoded=i.filter(x=>x.complete&&x.naturalWidth>0).length'
                                  '+"/"+i.length;});</script></body>'), encoding="utf-8")
    dom = _chromium(["--virtual-time-budget=5000", "--dump-dom", probe.as_uri()], tmp_path)
    assert f'data-decoded="{len(pngs)}/{len(pngs)}"' in dom.stdout
    assert '<table id="runs">' in dom.stdout
