"""The train use case: check inputs, decide the batch, open the record, run Ultralytics.

`run(config)` is what `detector train` calls. Every check that can fail on bad
input runs before the run folder is created (train.preflight), so a refused
command leaves nothing behind and overwrites nothing.
"""

from __future__ import annotations

import logging
import contextlib
import os
import platform
import shutil
import signal
import sys
import time
import traceback
from datetime import datetime
from pathlib import Path

from detector import fileio, paths
from detector.config import TrainConfig, jsonable
from detector.errors import (DetectorError, DiskFull, RunDirError, TrainingInterrupted, UsageError,
                             is_disk_full)
from detector.record import mlflow_log, tensorboard
from detector.record.writer import Recorder
from detector.train import autobatch, stepdown
from detector.train import resuming
from detector.train.lock import RunLock, refuse_if_live
from detector.train.preflight import prepare

log = logging.getLogger(__name__)


def _make_run_dir(project: Path, name: str | None) -> Path:
    """Create project/name (never reusing an existing folder) and return it."""
    project = project.expanduser().resolve()
    try:
        project.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise RunDirError(f"cannot create project folder {project}: {e.strerror}; pass a writable --project") from e
    if not os.access(project, os.W_OK | os.X_OK):
        raise RunDirError(f"project folder {project} is not writable; pass a writable --project")
    if name is None:
        return _make_default_run_dir(project)
    run_dir = project / name
    try:
        run_dir.mkdir()
    except FileExistsError:
        raise RunDirError(
            f"run {run_dir} already exists; choose another --name, or continue it with --resume {run_dir}"
        ) from None
    except OSError as e:
        raise RunDirError(f"cannot create run folder {run_dir}: {e.strerror}") from e
    return run_dir


def _make_default_run_dir(project: Path) -> Path:
    """project/train-<date>-<time>[-k]: mkdir is atomic, so two runs started in the same second get two folders."""
    stem = datetime.now().strftime("train-%Y%m%d-%H%M%S")
    for k in range(1, 1000):
        run_dir = project / (stem if k == 1 else f"{stem}-{k}")
        try:
            run_dir.mkdir()
            return run_dir
        except FileExistsError:
            continue
        except OSError as e:
            raise RunDirError(f"cannot create run folder {run_dir}: {e.strerror}") from e
    raise RunDirError(f"too many runs named {stem}-* in {project}; pass --name")


class _SigtermAsInterrupt:
    """Treat SIGTERM like Ctrl-C while training, so a killed job is marked interrupted, not left running."""

    def __enter__(self):
        self._old = signal.signal(signal.SIGTERM, self._raise) if _main_thread() else None
        return self

    @staticmethod
    def _raise(signum, frame):
        raise KeyboardInterrupt

    def __exit__(self, *exc):
        if self._old is not None:
            signal.signal(signal.SIGTERM, self._old)
        return False


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def _claim(run_dir: Path, data) -> tuple[RunLock, Path]:
    """Lock the new run folder and write its data.yaml; interrupted before run.json exists, leave no folder."""
    try:
        lock = RunLock(run_dir).acquire()  # a resume of this folder waits until this process ends
        return lock, data.write_resolved(run_dir / "data.yaml")
    except KeyboardInterrupt:
        shutil.rmtree(run_dir, ignore_errors=True)
        raise TrainingInterrupted("interrupted before training started; no run folder was kept") from None


def _supervise(recorder: Recorder, run_dir: Path, with_tensorboard: bool, work, start: dict | None = None) -> dict:
    """Write run.json (start), run work() with TensorBoard alongside when asked, and leave run.json completed,
    interrupted or failed whatever happens, a signal during any of it included."""
    stream = None
    try:
        with _SigtermAsInterrupt():
            if start is not None:
                recorder.start(start)
            if with_tensorboard:  # inside the block, so a signal during its setup still marks the run
                stream = tensorboard.live(recorder, run_dir)
            outcome = work()
    except KeyboardInterrupt:
        _finish(recorder, "interrupted")
        if not (run_dir / "weights" / "last.pt").is_file():
            raise TrainingInterrupted(f"training interrupted before its first epoch ended; {run_dir} has no "
                                      "checkpoint to resume from, so start a new run (it trains from scratch)") from None
        raise TrainingInterrupted(
            f"training interrupted; {run_dir} keeps every completed row and epoch, continue with --resume {run_dir}"
        ) from None
    except DetectorError as e:
        _finish(recorder, "failed", error=str(e))
        raise
    except Exception as e:  # Ultralytics or PyTorch failed: keep the traceback in the run, say one line here
        raise _failed(recorder, run_dir, e) from e
    finally:  # interrupted or failed runs get their event files too, as far as they got
        if with_tensorboard:
            tensorboard.after_training(run_dir, stream)
    recorder.finish("completed")
    return outcome


def _failed(recorder: Recorder, run_dir: Path, e: Exception) -> DetectorError:
    """Record an unexpected failure in run.json (and its traceback in error.log); the one-line error to raise."""
    if is_disk_full(e):
        where = getattr(e, "filename", None) or run_dir
        message = f"disk full while writing {where}; free space and continue with --resume {run_dir}"
        _finish(recorder, "failed", error=message)
        return DiskFull(message)
    with contextlib.suppress(OSError):
        fileio.write_text(run_dir / "error.log", traceback.format_exc())
    first = (str(e).strip().splitlines() or [type(e).__name__])[0]
    _finish(recorder, "failed", error=f"{type(e).__name__}: {first}")
    return DetectorError(f"training failed: {type(e).__name__}: {first} (traceback in {run_dir / 'error.log'})")


def _finish(recorder: Recorder, status: str, error: str | None = None) -> None:
    """recorder.finish, unless the disk cannot take even run.json: the error is then said on the way out."""
    try:
        recorder.finish(status, error=error)
    except OSError as e:
        if not is_disk_full(e):
            raise


def run(config: TrainConfig) -> Path:
    """Train one run and return its folder."""
    if config.resume is not None:
        return resume(config)
    if config.tensorboard:
        tensorboard.require()  # before any run folder exists
    if config.mlflow:
        mlflow_log.require()
    from detector.augment import pipelines

    try:
        config, data, model = prepare(config)
    except KeyboardInterrupt:  # Ctrl-C in the dataset check: nothing exists yet
        raise TrainingInterrupted("interrupted before training started; no run folder was created") from None
    pipeline = pipelines.resolve(config.augment, config.imgsz or 640)
    from detector.yolo import checks, fastload

    device = checks.device_info(config.device)
    decision = autobatch.decide(config, data, device)
    paths.check_writes([Path(config.project)], [data.root], what="--project")  # never inside a dataset or a run
    run_dir = _make_run_dir(config.project, config.name)
    with _SigtermAsInterrupt():  # from the folder's first moment: a signal leaves a marked run or nothing
        lock, data_yaml = _claim(run_dir, data)
        log.info(autobatch.describe(decision))
        log.info(f"augmentations {pipeline.describe()}")
        ul_args = {
            **config.overrides,
            "data": str(data_yaml), "model": model, "epochs": config.epochs or 100, "imgsz": config.imgsz or 640,
            "batch": decision.chosen, "seed": config.seed,
            "workers": fastload.choose_workers(config.workers, list(config.command) or sys.argv),  # CPU: Ultralytics' 0
            "project": str(run_dir.parent), "name": run_dir.name, "exist_ok": True,
            "augmentations": list(pipeline.transforms),  # replaces Ultralytics' default set; kept in its checkpoints
        }
        if config.device is not None:
            ul_args["device"] = config.device
        recorder = Recorder(run_dir)
        start = {
            "name": run_dir.name, "command": list(config.command) or sys.argv, "pid": os.getpid(),
            "host": platform.node(), "config": {**config.record(), "ultralytics": jsonable(ul_args)},
            "dataset": data.summary(), "model": config.model, "device": device, "batch": decision.summary(),
            "nbs": config.nbs, "augmentations": pipeline.record(), "versions": checks.versions(),
            "loader": checks.training_loader(config.overrides),  # the trainer reads it back on resume and step-down
            "events": [],
        }
        started = time.time()
        tracking = mlflow_log.Tracking(config.mlflow, recorder)
        try:
            _supervise(recorder, run_dir, config.tensorboard, tracking.around(
                lambda: stepdown.fit(stepdown.Attempt(ul_args), run_dir, recorder, config.batch.candidates)),
                start=start)
        finally:
            tracking.finish()
            lock.release()
    log.info(f"run {run_dir} completed in {time.time() - started:.0f} s")
    return run_dir


def resume(config: TrainConfig) -> Path:
    """Continue the run in config.resume from its last completed epoch (or only finish its final validation)."""
    run_dir = Path(config.resume).expanduser().resolve()
    if not (run_dir / "run.json").is_file():
        raise RunDirError(f"{run_dir} is not a detector run (no run.json); pass a folder under runs/")
    with RunLock(run_dir):  # released when the resume ends, or by the kernel when its process dies
        return _resume(config, run_dir)


def _resume(config: TrainConfig, run_dir: Path) -> Path:
    recorder = Recorder(run_dir)
    state = resuming.read_state(recorder, run_dir)
    refuse_if_live(run_dir, state)
    if state.get("status") == "completed":
        raise RunDirError(f"run {run_dir} already completed; start a new run to train further")
    if config.augment is not None:  # Ultralytics restores the pipeline from last.pt's args
        raise UsageError(f"--augment cannot change a resumed run; {run_dir} continues with the pipeline in its run.json")
    _refuse_resume_options(config, run_dir)
    plan = resuming.plan(run_dir)
    last = plan.last
    with_tensorboard = config.tensorboard or bool((state.get("config") or {}).get("tensorboard"))
    if with_tensorboard:
        tensorboard.require()
    # last.pt remembers the folder it was saved in; a run that was copied or moved (a Ray sweep continues a
    # lost node's run in a copy) must keep writing where it is now, with the data.yaml beside it.
    ul_args = {"save_dir": str(run_dir)}
    if (run_dir / "data.yaml").is_file():
        ul_args["data"] = str(run_dir / "data.yaml")
    if config.device is not None:
        ul_args["device"] = config.device
    if not config.batch.auto:  # e.g. after an out-of-memory error no candidate survived
        ul_args["batch"] = config.batch.requested
    recorder.update(status="running", finished=None, error=None, pid=os.getpid(), host=platform.node(),
                    resumed=[*state.get("resumed", []), {"command": list(config.command) or sys.argv}])
    candidates = TrainConfig.from_record(state.get("config") or {}).batch.candidates
    work = lambda: stepdown.fit(stepdown.Attempt(ul_args, last), run_dir, recorder, candidates)  # noqa: E731
    if plan.note:
        log.info(plan.note)
        recorder.event("checkpoint_damaged", detail=plan.note)
    if plan.action == "final":  # every epoch ended: only the validation of best.pt is missing
        from detector.yolo import final

        log.info(f"resuming {run_dir}: every epoch ended, running the final validation of best.pt")
        recorder.event("resumed", final_validation_only=True)
        work = lambda: final.final_validation(run_dir, recorder, config.device)  # noqa: E731
    else:
        log.info(f"resuming {run_dir} from {last}")
    tracking = mlflow_log.Tracking(config.mlflow or (state.get("mlflow") or {}).get("uri"), recorder)
    try:  # a resume logs to the MLflow run the run logged to
        _supervise(recorder, run_dir, with_tensorboard, tracking.around(work))
    finally:
        tracking.finish()
    return run_dir


# What a resume may be given: Ultralytics restores every other option from last.pt (the pipeline is refused above).
_FREE_ON_RESUME = ("resume", "device", "batch.requested", "augment", "tensorboard", "grad_stats", "download", "mlflow")


def _refuse_resume_options(config: TrainConfig, run_dir: Path) -> None:
    """A resumed run continues with its own settings: say so instead of ignoring an option."""
    changed = config.to_argv(skip=_FREE_ON_RESUME)
    if changed:
        flag = changed[0] if changed[0].startswith("--") else "KEY=VALUE"
        raise UsageError(f"{flag} cannot change a resumed run; {run_dir} continues with the settings in its "
                         "run.json (only --device and --batch may be given with --resume)")
