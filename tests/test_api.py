"""The Python API (detector.api): the CLI's library functions, objects for notebooks, the same typed errors."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import detector
from detector import api, progress
from detector.errors import DetectorError, RunDirError, UsageError
from detector.views import Report, Run

pd = pytest.importorskip("pandas")


def test_keywords_make_the_config_the_command_line_makes():
    from detector import options
    from detector.cli import main

    argv = ["--data", "d.yaml", "--epochs", "3", "--batch", "16", "--batch-candidates", "8,16", "--no-grad-stats",
            "--mlflow", "m.db", "lr0=0.01", "mosaic=0"]
    # The group's help names, as `detector train` has them: Click caches the help option on the command.
    ctx = main.commands["train"].make_context("train", list(argv), help_option_names=["-h", "--help"])
    cli = options.train_config(ctx.params)
    got = api.train_config(data="d.yaml", epochs=3, batch=16, batch_candidates=[8, 16], grad_stats=False,
                           mlflow="m.db", lr0=0.01, mosaic=0)
    assert got.to_argv() == cli.to_argv() == argv
    assert got.command == ("detector", "train", *argv)
    assert api.train_config(no_grad_stats=True).grad_stats is False  # the flag's name works too


def test_train_signature_shows_the_declared_defaults():
    import inspect

    sig = inspect.signature(api.train)
    assert sig.parameters["model"].default == "yolo11n.yaml" and sig.parameters["batch"].default == "auto"
    assert sig.parameters["mlflow"].default is None and "overrides" in sig.parameters


def test_train_returns_the_run_with_tables_and_one_line_per_epoch(tiny_data, tmp_path, capsys):
    run = detector.train(tiny_data, epochs=2, imgsz=64, batch=16, project=tmp_path, name="api", plots=False)
    out = capsys.readouterr().out
    assert isinstance(run, Run) and run.status == "completed" and run.path == tmp_path / "api"
    epochs, iterations = run.epochs, run.iterations
    assert isinstance(epochs, pd.DataFrame) and list(epochs["epoch"]) == [1, 2]
    assert len(iterations) == 6 and iterations["iteration"].tolist() == list(range(1, 7))
    assert {"loss", "lr", "box_loss"} <= set(iterations.columns) and {"map50", "map50_95"} <= set(epochs.columns)
    assert run.batch["chosen"] == 16 and run.config["ultralytics"]["plots"] is False and run.nbs == 64
    assert run.best == tmp_path / "api" / "weights" / "best.pt" and run.last.is_file()
    assert run.command[:2] == ["detector", "train"]
    epoch_lines = [line for line in out.splitlines() if line.startswith("api epoch ")]
    assert [line.split(":")[0] for line in epoch_lines] == ["api epoch 1/2", "api epoch 2/2"], out
    assert "mAP50" in epoch_lines[-1]
    assert len(out.splitlines()) < 15 and "it/s" not in out, out  # no per-iteration bars
    assert logging_restored()


def logging_restored() -> bool:
    import logging

    return not any(isinstance(h, progress._PrintHandler) for h in logging.getLogger("detector").handlers)


def test_run_shows_its_summary_and_plot(tiny_run):
    run = detector.open_run(tiny_run)
    page = run._repr_html_()
    assert "completed" in page and "data:image/png;base64," in page and "best map50" in page
    assert repr(run) == f"Run({str(tiny_run)!r}, status='completed', epochs=2)"
    assert run.dataset["train_images"] == 40 and "versions" in dir(run)
    with pytest.raises(AttributeError):
        run.no_such_fact


def test_compare_returns_a_report_shown_inline(tiny_run, tmp_path):
    other = tmp_path / "tiny-copy"
    shutil.copytree(tiny_run, other, ignore=shutil.ignore_patterns("weights"))
    report = detector.compare([tiny_run, detector.open_run(other)], out=tmp_path / "cmp")
    assert isinstance(report, Report) and report.path == tmp_path / "cmp" / "report.html"
    page = report._repr_html_()
    assert page.startswith("<iframe") and "srcdoc=" in page and "&lt;html" in page
    assert report.markdown.is_file()


def test_errors_are_the_typed_ones(tmp_path, tiny_data):
    with pytest.raises(RunDirError):
        detector.open_run(tmp_path)
    with pytest.raises(UsageError):
        detector.train(tiny_data, epochs=0, project=tmp_path)
    with pytest.raises(UsageError):
        detector.sweep([16, 32], seed=3, project=tmp_path)  # a sweep sets each run's seed
    with pytest.raises(DetectorError):
        detector.train(tmp_path / "missing.yaml", epochs=1, project=tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_plan_is_what_detector_batch_answers(tiny_data):
    decision = detector.plan(tiny_data, imgsz=64, device="cpu")
    assert decision.chosen == 16 and decision.summary()["requested"] == "auto"


def test_import_detector_stays_light_and_train_stays_callable():
    code = ("import sys, detector; assert not {'numpy', 'torch', 'click', 'pandas'} & set(sys.modules), "
            "sorted(set(sys.modules) & {'numpy', 'torch', 'click', 'pandas'}); "
            "f = detector.train; import detector.train.run; assert callable(detector.train) and callable(f); "
            "assert detector.open_run.__module__ == 'detector.api'")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_epoch_lines_follow_only_this_process_runs(tmp_path):
    import io
    import json
    import os

    mine, other = tmp_path / "sweep" / "b16-s0", tmp_path / "old"
    for folder, pid in ((mine, os.getpid()), (other, 1)):
        folder.mkdir(parents=True)
        (folder / "run.json").write_text(json.dumps({"pid": pid, "config": {"ultralytics": {"epochs": 3}}}))
        (folder / "epochs.csv").write_text("epoch,train_box_loss,train_cls_loss,map50,map50_95,epoch_time_s\n"
                                           "1,1.5,2.5,0.25,0.125,3.0\n2,1.0,2.0,0.5,0.25")  # row 2 still being written
    out = io.StringIO()
    lines = progress.EpochLines(tmp_path, out=out)
    lines.stop()
    assert out.getvalue().splitlines() == ["b16-s0 epoch 1/3: loss 4.000, mAP50 0.250, mAP50-95 0.125 (3.0 s)"]


@pytest.mark.parametrize("fault", [KeyboardInterrupt, ZeroDivisionError])
def test_a_stopped_training_lets_go_of_its_model(tiny_data, tmp_path, monkeypatch, fault):
    # A notebook keeps the last exception (sys.last_value) and, through its traceback, every frame it
    # passed: there the trainer's model, optimizer and batch stay allocated on the GPU, and the next
    # training in that kernel starts on top of them (a published batch-16 run read 8.5 GiB where a
    # batch-32 attempt had just been interrupted at 8.39). The error raised must not keep them.
    import gc
    import weakref

    from detector.errors import TrainingInterrupted
    from detector.yolo import callbacks

    trainers = []

    def stop(self, trainer):
        trainers.append(weakref.ref(trainer))
        raise fault

    monkeypatch.setattr(callbacks.IterationRows, "on_train_batch_end", stop)
    expected = TrainingInterrupted if fault is KeyboardInterrupt else DetectorError
    with pytest.raises(expected) as caught:
        detector.train(tiny_data, epochs=1, imgsz=64, batch=16, project=tmp_path, name="stop", plots=False)
    kept = caught.value  # as the notebook keeps it
    gc.collect()
    assert trainers and trainers[0]() is None, gc.get_referrers(trainers[0]())
    assert kept.__traceback__ is not None
