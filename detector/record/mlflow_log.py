"""MLflow logging of a run (detector train --mlflow URI): params, every row of the record, the run folder's files.

Opt-in: nothing imports mlflow without --mlflow. Like record.tensorboard's
LiveWriter, the logger is a Recorder listener: it gets each row's cells exactly
as written to iterations.csv and epochs.csv and only queues them; a background
thread sends the queue with MlflowClient.log_batch (at most 1000 metrics a
request) every FLUSH_S seconds and at each epoch's end, so an iteration never
waits on the network. When training ends the run's files go up as artifacts and
the MLflow run ends with the run's status. A tracking store that cannot be
reached is said in one line; training goes on and records locally.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections import deque
from pathlib import Path

from detector.errors import UsageError
from detector.record.tensorboard import epoch_tag, iteration_tag

log = logging.getLogger(__name__)

INSTALL_HINT = "pip install 'detector[mlflow]'"
DEFAULT_EXPERIMENT = "detector"  # MLFLOW_EXPERIMENT_NAME, as MLflow itself reads it, names another
FLUSH_S = 5.0  # how stale the MLflow view of a live run may get
CLOSE_S = 60.0  # how long the end of training waits for the last batches before giving up on them
BATCH = 1000  # MLflow's limit of metrics per log_batch request
# iterations.csv columns that are the step or a running count, not measurements.
ITERATION_SKIP = ("epoch", "iteration", "epoch_iteration", "images_seen", "optimizer_step", "time_s")
# Files of the run folder logged as artifacts (folder inside the MLflow run, path in the run folder).
ARTIFACTS = (("", "run.json"), ("", "iterations.csv"), ("", "epochs.csv"), ("", "results.csv"), ("", "args.yaml"),
             ("", "data.yaml"), ("", "error.log"), ("weights", "weights/best.pt"))
STATUS = {"completed": "FINISHED", "failed": "FAILED", "interrupted": "KILLED"}


def require() -> None:
    """Refuse --mlflow up front (before a run folder exists) when the mlflow package is missing."""
    try:
        _client_class()
    except ImportError:
        raise UsageError(f"--mlflow needs the mlflow package, which is not installed; {INSTALL_HINT}") from None


def _client_class():
    # MLflow 3 sends usage telemetry unless told not to; the tool never sends telemetry (hermetic runtime).
    os.environ["MLFLOW_DISABLE_TELEMETRY"] = "true"
    from mlflow.tracking import MlflowClient

    return MlflowClient


def tracking_uri(text: str) -> str:
    """The tracking URI --mlflow means: URIs as given; a path ending in .db is a SQLite store, another a folder store."""
    text = str(text).strip()
    if "://" in text or text.startswith(("sqlite:", "databricks")):
        return text
    path = Path(text).expanduser().resolve()
    return f"sqlite:///{path}" if path.suffix == ".db" else path.as_uri()


def client(uri: str):
    """An MlflowClient for uri (a folder store allowed: MLflow 3 refuses it unless asked, and the user asked)."""
    if uri.startswith("file:"):
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    return _client_class()(tracking_uri=uri)


@contextlib.contextmanager
def _fail_fast():
    """No retries with back-off (minutes) while finding out whether the store answers at all."""
    saved = {k: os.environ.get(k) for k in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT")}
    os.environ.update(MLFLOW_HTTP_REQUEST_MAX_RETRIES="0", MLFLOW_HTTP_REQUEST_TIMEOUT="10")
    try:
        yield
    finally:
        for k, v in saved.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)


def experiment_id(mlflow_client, uri: str, name: str | None = None) -> str:
    """The id of the experiment runs go to (created when missing; a SQLite store keeps artifacts beside its file)."""
    name = name or os.environ.get("MLFLOW_EXPERIMENT_NAME") or DEFAULT_EXPERIMENT
    found = mlflow_client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    location = None
    if uri.startswith("sqlite:///"):  # MLflow would use ./mlruns in whatever folder the process runs in
        location = (Path(uri.removeprefix("sqlite:///")).resolve().parent / "mlartifacts" / name).as_uri()
    return mlflow_client.create_experiment(name, artifact_location=location)


def params(meta: dict) -> dict[str, str]:
    """The run's effective config and batch decision as flat MLflow params (dotted keys, text values)."""
    config = dict(meta.get("config") or {})
    ultralytics = dict(config.pop("ultralytics", None) or {})
    ultralytics.pop("augmentations", None)  # long; run.json (an artifact) keeps the pipeline
    for key in ("command", "overrides", "mlflow"):
        config.pop(key, None)
    flat = {**_flat(config), **_flat(ultralytics, "ultralytics.")}
    batch = {k: v for k, v in (meta.get("batch") or {}).items() if k not in ("table", "used")}
    flat.update(_flat(batch, "batch."))
    flat.update({k: meta[k] for k in ("model", "nbs", "accumulate", "optimizer", "lr0") if meta.get(k) is not None})
    device = meta.get("device") or {}
    flat.update({f"device.{k}": device[k] for k in ("name", "total_memory_gb") if device.get(k) is not None})
    return {k[:250]: str(v)[:6000] for k, v in sorted(flat.items()) if v is not None}


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def metrics_of(kind: str, cells: dict, now_ms: int) -> list:
    """The MLflow metrics of one recorded row: every non-empty measurement, at step iteration (or epoch)."""
    from mlflow.entities import Metric

    if kind == "iteration":
        step, tag, skip = int(cells["iteration"]), iteration_tag, ITERATION_SKIP
    else:
        step, tag, skip = int(cells["epoch"]), epoch_tag, ("epoch",)
    out = []
    for column, text in cells.items():
        if column in skip or not str(text).strip():
            continue
        try:
            out.append(Metric(tag(column), float(text), now_ms, step))
        except ValueError:
            continue
    return out


class MlflowLogger:
    """A Recorder listener that sends rows to one MLflow run from a background thread, in batches.

    iteration() and epoch() only queue the cells (the training thread's whole cost);
    after a failure it logs one line and sends nothing more, and training goes on.
    """

    def __init__(self, mlflow_client, run_id: str, uri: str):
        self.client, self.run_id, self.uri = mlflow_client, run_id, uri
        self.sent = 0
        self.error: str | None = None
        self._rows: deque = deque()
        self._wake, self._stop = threading.Event(), threading.Event()
        self._thread = threading.Thread(target=self._loop, name="detector-mlflow", daemon=True)
        self._thread.start()

    def iteration(self, cells: dict) -> None:
        self._rows.append(("iteration", cells, time.time()))

    def epoch(self, cells: dict) -> None:
        self._rows.append(("epoch", cells, time.time()))
        self._wake.set()

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(FLUSH_S)
            self._wake.clear()
            self.flush()

    def flush(self) -> None:
        """Send every queued row (called by the thread; by close() once the thread ended)."""
        metrics = []
        while self._rows:
            kind, cells, when = self._rows.popleft()
            if self.error is None:
                metrics += metrics_of(kind, cells, int(when * 1000))
        for i in range(0, len(metrics), BATCH):
            if self.error is not None:
                return
            try:
                self.client.log_batch(self.run_id, metrics=metrics[i:i + BATCH])
                self.sent += len(metrics[i:i + BATCH])
            except Exception as e:  # the tracking store went away: training goes on, the run folder has it all
                self.error = _one_line(e)
                log.warning(f"MLflow at {self.uri} stopped answering ({self.error}); training goes on and records "
                            "locally, nothing more is sent")

    def close(self) -> None:
        """Stop the thread and send what is left (waiting at most CLOSE_S)."""
        self._stop.set()
        self._wake.set()
        self._thread.join(CLOSE_S)
        if self._thread.is_alive():
            self.error = self.error or f"no answer within {CLOSE_S:.0f} s"
            log.warning(f"MLflow at {self.uri} did not take the last metrics ({self.error}); the run folder has them")
            return
        self.flush()


def _one_line(e: Exception) -> str:
    first = (str(e).strip().splitlines() or [type(e).__name__])[0]
    return first if len(first) < 200 else first[:197] + "..."


def start(recorder, uri: str) -> MlflowLogger | None:
    """Open (or, on a resume, reopen) the MLflow run of a recorder whose run.json is written; attach the logger.

    Records {uri, experiment_id, run_id} as run.json's `mlflow`. A store that does
    not answer gives one line and None: training goes on without MLflow.
    """
    uri = tracking_uri(uri)
    meta = recorder.read()
    before = meta.get("mlflow") or {}
    try:
        mc = client(uri)
        with _fail_fast():
            if before.get("run_id") and before.get("uri") == uri:  # a resume continues its MLflow run
                run_id = before["run_id"]
                mc.update_run(run_id, status="RUNNING")
                eid = before.get("experiment_id")
            else:
                eid = experiment_id(mc, uri)
                tags = _tags(meta, recorder.run_dir)
                run_id = mc.create_run(eid, run_name=meta.get("name"), tags=tags).info.run_id
                _log_params(mc, run_id, params(meta))
    except Exception as e:
        line = _one_line(e)
        log.warning(f"MLflow at {uri} cannot be reached ({line}); training goes on and records in "
                    f"{recorder.run_dir} only")
        recorder.update(mlflow={"uri": uri, "run_id": before.get("run_id"), "error": line})
        return None
    recorder.update(mlflow={"uri": uri, "experiment_id": eid, "run_id": run_id})
    log.info(f"MLflow: logging to run {run_id} at {uri}")
    logger = MlflowLogger(mc, run_id, uri)
    recorder.listeners.append(logger)
    return logger


class Tracking:
    """What training wraps around its work for --mlflow: the MLflow run opens once run.json is written
    (`around`), and ends after run.json holds the outcome (`finish`). Without a URI both do nothing."""

    def __init__(self, uri: str | None, recorder):
        self.uri, self.recorder, self.logger = uri, recorder, None

    def around(self, work):
        if not self.uri:
            return work

        def tracked():
            self.logger = start(self.recorder, self.uri)
            return work()

        return tracked

    def finish(self) -> None:
        logger, self.logger = self.logger, None
        finish(logger, self.recorder)


def _tags(meta: dict, run_dir: Path) -> dict:
    tags = {"run_dir": str(run_dir), "mlflow.source.name": "detector"}
    sweep = (meta.get("config") or {}).get("sweep") or {}
    if sweep.get("sweep"):
        tags["sweep"] = str(sweep["sweep"])
    return {k: v for k, v in tags.items() if v}


def _log_params(mc, run_id: str, values: dict) -> None:
    from mlflow.entities import Param

    items = [Param(k, v) for k, v in values.items()]
    for i in range(0, len(items), 100):  # MLflow's limit of params per request
        mc.log_batch(run_id, params=items[i:i + 100])


def finish(logger: MlflowLogger | None, recorder) -> None:
    """After training, whatever its outcome: last metrics, the run folder's files, the MLflow run's end status.

    Called from a `finally`: a failure here is one line and never hides why training stopped.
    """
    if logger is None:
        return
    recorder.listeners.remove(logger)
    logger.close()
    meta = recorder.read()
    try:
        if logger.error is None:
            log_files(logger.client, logger.run_id, recorder.run_dir)
            used = (meta.get("batch") or {}).get("used")
            if used is not None:
                logger.client.set_tag(logger.run_id, "batch_used", str(used))
        logger.client.set_terminated(logger.run_id, STATUS.get(meta.get("status"), "FAILED"))
    except Exception as e:
        logger.error = _one_line(e)
    if logger.error is not None:
        log.warning(f"MLflow run {logger.run_id} is incomplete ({logger.error}); {recorder.run_dir} has everything")
        return
    log.info(f"MLflow: {logger.sent} metric values and the run's files in run {logger.run_id} at {logger.uri}")


def log_files(mc, run_id: str, run_dir: Path) -> None:
    """The run folder's record and best weights as artifacts of the MLflow run."""
    for folder, name in ARTIFACTS:
        path = Path(run_dir) / name
        if path.is_file():
            mc.log_artifact(run_id, str(path), artifact_path=folder or None)


def log_sweep(uri: str, folder: Path, run_dirs: list[Path]) -> str | None:
    """A sweep's MLflow run: its report and sweep.json as artifacts, its runs nested under it; returns its run id.

    A re-run of the same sweep reuses the MLflow run found by the sweep folder's tag.
    """
    import json

    uri = tracking_uri(uri)
    try:
        mc = client(uri)
        with _fail_fast():
            eid = experiment_id(mc, uri)
        found = mc.search_runs([eid], filter_string=f"tags.sweep_dir = '{folder}'", max_results=1)
        run_id = found[0].info.run_id if found else mc.create_run(
            eid, run_name=folder.name, tags={"sweep_dir": str(folder), "mlflow.source.name": "detector"}
        ).info.run_id
        for name in ("report.html", "report.md", "sweep.json"):
            if (folder / name).is_file():
                mc.log_artifact(run_id, str(folder / name))
        if (folder / "plots").is_dir():
            mc.log_artifacts(run_id, str(folder / "plots"), artifact_path="plots")
        for run_dir in run_dirs:  # MLflow's UI nests a run under the run its parentRunId tag names
            child = (json.loads((run_dir / "run.json").read_text(encoding="utf-8")).get("mlflow") or {})
            if child.get("run_id") and child.get("uri") == uri:
                mc.set_tag(child["run_id"], "mlflow.parentRunId", run_id)
        mc.set_terminated(run_id, "FINISHED")
    except Exception as e:
        log.warning(f"MLflow at {uri}: the sweep's report was not logged ({_one_line(e)}); it is in {folder}")
        return None
    log.info(f"MLflow: sweep report in run {run_id} at {uri}")
    return run_id
