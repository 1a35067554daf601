"""TensorBoard event files from a run's records (detector train --tensorboard, detector tensorboard RUN).

The event files hold exactly the cells the recorder writes to iterations.csv and
epochs.csv (6 significant digits), never values read from a live trainer: while
training, LiveWriter streams each row as the Recorder writes it (a Recorder
listener); when training ends, `write` rebuilds the folder from the CSVs, so a
resumed run whose unfinished epoch was dropped from the CSVs is shown without
it. The same `write` converts runs trained without --tensorboard. Every numeric
column becomes a series, so columns other parts add (grad_norm,
grad_noise_scale) appear without a change here; the run's resolved
configuration goes to TensorBoard's HParams dashboard.

The files go to RUN/tensorboard/, written into a temporary folder and swapped
into place, so a reader never sees half a conversion. Uses only the tensorboard
package's own writer and protos (no TensorFlow, no torch); nothing touches the
network.
"""

from __future__ import annotations

import logging
import json
import math
import time
from datetime import datetime
from pathlib import Path

import numpy as np

from detector import fileio
from detector.errors import UsageError
from detector.record import runs
from detector.record.writer import EPOCH_METRICS

log = logging.getLogger(__name__)

TB_DIR = "tensorboard"
INSTALL_HINT = "pip install 'detector[tensorboard]'"
# Columns that are the step axis (or its parts), not a measurement.
ITERATION_INDEX = ("epoch", "iteration", "epoch_iteration")
EPOCH_INDEX = ("epoch",)
# run.json fields that describe the training as it really ran, shown beside the config in HParams.
RUN_FACTS = ("model", "nbs", "accumulate", "optimizer", "lr0", "iterations_per_epoch")


def require() -> None:
    """Refuse --tensorboard up front (before a run folder exists) when the tensorboard package is missing."""
    try:
        import tensorboard.summary.writer.event_file_writer  # noqa: F401
    except ImportError:
        raise UsageError(f"--tensorboard needs the tensorboard package, which is not installed; {INSTALL_HINT}") \
            from None


def iteration_tag(column: str) -> str:
    """The TensorBoard tag of an iterations.csv column (x axis: the global iteration)."""
    return f"iteration/{column}"


def epoch_tag(column: str) -> str:
    """The TensorBoard tag of an epochs.csv column (x axis: the epoch), grouped as Ultralytics groups them."""
    if column in EPOCH_METRICS:
        return f"metrics/{column}"
    for prefix in ("val_", "train_"):
        if column.startswith(prefix):
            return f"{prefix[:-1]}/{column[len(prefix):]}"
    return f"epoch/{column}"


def hparams(meta: dict) -> dict:
    """The run's resolved configuration as flat TensorBoard hyperparameters (str, float or bool values)."""
    config = dict(meta.get("config") or {})
    ultralytics = dict(config.pop("ultralytics", None) or {})
    ultralytics.pop("augmentations", None)  # the pipeline is long; its preset name is config's `augment`
    for key in ("command", "overrides"):
        config.pop(key, None)  # argv, and what `ultralytics` already holds resolved
    flat = {**config, **{k: v for k, v in ultralytics.items() if k not in config}}
    flat.update({k: meta[k] for k in RUN_FACTS if meta.get(k) is not None})
    batch = meta.get("batch") or {}
    if batch.get("used") is not None:
        flat["batch_used"] = batch["used"]
    for key, value in list(flat.items()):  # a sweep's name and lr rule, the starting weights' url and sha256
        if isinstance(value, dict):
            del flat[key]
            flat.update({f"{key}_{k}": v for k, v in value.items()})
    return {k: _hparam_value(v) for k, v in sorted(flat.items()) if v is not None}


def _hparam_value(value):
    if isinstance(value, (bool, str)):
        return value
    if isinstance(value, (int, float)):
        return float(value)
    return json.dumps(value, default=str)  # lists and dicts: shown as text


def write(run_dir: str | Path) -> dict:
    """Write RUN/tensorboard/ from the run's CSVs, replacing what was there; return counts of what was written."""
    require()
    run = runs.load(run_dir)
    with fileio.staged_dir(run.path / TB_DIR) as tmp:  # the old folder stays until the new one is complete
        counts = _write_events(run, tmp)
    return {"path": run.path / TB_DIR, **counts}


def _write_events(run: runs.Run, logdir: Path) -> dict:
    from tensorboard.summary.writer.event_file_writer import EventFileWriter

    logdir.mkdir(parents=True, exist_ok=True)
    start = _started(run.meta)
    writer = EventFileWriter(str(logdir))
    try:
        writer.add_event(_hparams_event(run, start))
        it, ep = run.iterations, run.epochs
        times = it.get("time_s")
        n_iter = _scalars(writer, it, ITERATION_INDEX, "iteration", iteration_tag,
                          lambda i: start + (times[i] if times is not None and not math.isnan(times[i]) else 0.0))
        end_of_epoch = _epoch_end_times(it)
        n_epoch = _scalars(writer, ep, EPOCH_INDEX, "epoch", epoch_tag,
                           lambda i: start + end_of_epoch.get(int(ep.get("epoch")[i]), 0.0))
        writer.add_event(_session_end_event(run))
    finally:
        writer.close()
    return {"iteration_values": n_iter, "epoch_values": n_epoch, "iterations": len(it), "epochs": len(ep)}


def _scalars(writer, table: runs.Table, index: tuple, step_column: str, tag, wall_time) -> int:
    """One scalar event per non-empty cell of every measurement column; returns how many were written."""
    from tensorboard.compat.proto import event_pb2, summary_pb2

    steps = table.get(step_column)
    columns = [c for c in table.columns if c not in index]
    written = 0
    for i in range(len(table)):
        values = [summary_pb2.Summary.Value(tag=tag(c), simple_value=float(table.values[c][i]))
                  for c in columns if not math.isnan(table.values[c][i])]
        if values and not math.isnan(steps[i]):
            writer.add_event(event_pb2.Event(wall_time=wall_time(i), step=int(steps[i]),
                                             summary=summary_pb2.Summary(value=values)))
            written += len(values)
    return written


def _epoch_end_times(iterations: runs.Table) -> dict[int, float]:
    """Seconds since the start at each epoch's last iteration (time_s), for the epoch events' wall time."""
    ep, t = iterations.get("epoch"), iterations.get("time_s")
    if ep is None or t is None:
        return {}
    return {int(e): float(np.nanmax(t[ep == e])) for e in set(ep[~np.isnan(ep)].tolist())}


def _started(meta: dict) -> float:
    try:
        return datetime.fromisoformat(meta["started"]).timestamp()
    except (KeyError, TypeError, ValueError):
        return 0.0


def _hparams_event(run: runs.Run, start: float):
    """The HParams plugin's session-start summary: the config, grouped by run name."""
    from tensorboard.plugins.hparams import plugin_data_pb2

    info = plugin_data_pb2.SessionStartInfo(group_name=run.name, start_time_secs=start)
    for key, value in hparams(run.meta).items():
        if isinstance(value, bool):
            info.hparams[key].bool_value = value
        elif isinstance(value, float):
            info.hparams[key].number_value = value
        else:
            info.hparams[key].string_value = value
    return _plugin_event(plugin_data_pb2.HParamsPluginData(session_start_info=info), "session_start_info", start)


def _session_end_event(run: runs.Run):
    from tensorboard.plugins.hparams import api_pb2, plugin_data_pb2

    status = {"completed": api_pb2.STATUS_SUCCESS, "failed": api_pb2.STATUS_FAILURE,
              "interrupted": api_pb2.STATUS_FAILURE, "running": api_pb2.STATUS_RUNNING}.get(
        run.status, api_pb2.STATUS_UNKNOWN)
    end = _started({"started": run.meta.get("finished")})
    info = plugin_data_pb2.SessionEndInfo(status=status, end_time_secs=end)
    return _plugin_event(plugin_data_pb2.HParamsPluginData(session_end_info=info), "session_end_info", end)


def _plugin_event(data, kind: str, wall_time: float):
    from tensorboard.compat.proto import event_pb2, summary_pb2
    from tensorboard.plugins.hparams import metadata

    tag = metadata.SESSION_START_INFO_TAG if kind == "session_start_info" else metadata.SESSION_END_INFO_TAG
    value = summary_pb2.Summary.Value(tag=tag, metadata=metadata.create_summary_metadata(data),
                                      tensor=metadata.NULL_TENSOR)
    return event_pb2.Event(wall_time=wall_time, step=0, summary=summary_pb2.Summary(value=[value]))


class LiveWriter:
    """Streams each row to RUN/tensorboard/ as the recorder writes it, so TensorBoard shows training live.

    A Recorder listener (Recorder.listeners): it gets the cells exactly as written
    to the CSVs. At the end of training `after_training` rewrites the folder from
    the CSVs, which drops rows the CSVs dropped (an epoch redone or resumed).
    Never stops training: after a failure it writes nothing more.
    """

    FLUSH_S = 5  # how stale TensorBoard's live view may get

    def __init__(self, run_dir: Path, meta: dict):
        from tensorboard.summary.writer.event_file_writer import EventFileWriter

        run = runs.Run(path=Path(run_dir), meta=meta, iterations=runs.Table(), epochs=runs.Table())
        self._writer = EventFileWriter(str(Path(run_dir) / TB_DIR), flush_secs=self.FLUSH_S)
        self._writer.add_event(_hparams_event(run, _started(meta)))

    def iteration(self, cells: dict) -> None:
        self._emit(cells, ITERATION_INDEX, "iteration", iteration_tag)

    def epoch(self, cells: dict) -> None:
        self._emit(cells, EPOCH_INDEX, "epoch", epoch_tag)
        if self._writer is not None:
            self._writer.flush()

    def _emit(self, cells: dict, index: tuple, step_column: str, tag) -> None:
        if self._writer is None:
            return
        try:
            from tensorboard.compat.proto import event_pb2, summary_pb2

            values = [summary_pb2.Summary.Value(tag=tag(c), simple_value=_cell(v))
                      for c, v in cells.items() if c not in index and not math.isnan(_cell(v))]
            if values:
                self._writer.add_event(event_pb2.Event(wall_time=time.time(), step=int(cells[step_column]),
                                                       summary=summary_pb2.Summary(value=values)))
        except Exception:  # a TensorBoard problem must not stop training; the final rewrite says what failed
            self.close()

    def close(self) -> None:
        if self._writer is not None:
            writer, self._writer = self._writer, None
            writer.close()


def _cell(text: str) -> float:
    """A CSV cell as the reader reads it: a float, NaN when empty."""
    try:
        return float(text) if str(text).strip() else math.nan
    except ValueError:
        return math.nan


def live(recorder, run_dir: Path) -> LiveWriter:
    """Attach a LiveWriter to a recorder whose run.json is written; returns it (close it when training ends)."""
    writer = LiveWriter(run_dir, recorder.read())
    recorder.listeners.append(writer)
    return writer


def after_training(run_dir: Path, stream: LiveWriter | None = None) -> None:
    """Write the event files at the end of `detector train --tensorboard`, whatever the run's outcome.

    Replaces what the live stream wrote with the CSVs' final rows. Called from a
    `finally`, so a failure here is reported as a line and never hides why
    training stopped.
    """
    if stream is not None:
        stream.close()
    try:
        done = write(run_dir)
    except Exception as e:  # the run's own outcome matters more than its TensorBoard copy
        log.info(f"TensorBoard files not written: {e}; write them with: detector tensorboard {run_dir}")
        return
    log.info(f"TensorBoard: {done['path']} ({done['iterations']} iterations, {done['epochs']} epochs); "
             f"view with: tensorboard --logdir {Path(run_dir).parent}")
