"""One run of a distributed sweep as a worker runs it: the ordinary training, in a subprocess, in its own folder.

An attempt trains in SWEEP/.attempts/<run>/<attempt>/<run> and is renamed to
SWEEP/<run> only when the training exits 0, so a lost node never leaves a half
run where a finished one belongs. A later attempt (Ray's retry after a node was
lost, or a re-run of the sweep) continues the furthest earlier attempt from a
copy of it: the earlier process may still be writing to its own folder (a node
cut off, not dead), and a copy never shares files with it.

Nothing here imports Ray: the Ray backend ships these functions to its workers,
and the tests call them directly.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from detector import fileio
from detector.config import TrainConfig
from detector.record.writer import Recorder, now_iso, write_json_atomic

ATTEMPTS = ".attempts"  # SWEEP/.attempts/<run>/<attempt>/: one folder per try of a run
ATTEMPT_JSON = "attempt.json"  # where and when an attempt started (the driver's progress reads it)
LOG = "train.log"  # the training's stdout and stderr, kept in the run folder
STORAGE_PROBE = ".storage-check"
INTERRUPTED_EXIT = 130  # detector train's exit status after Ctrl-C or SIGTERM


@dataclass(frozen=True)
class RunSpec:
    """What a worker needs to train one run of a sweep (plain data: it travels to other machines)."""

    folder: str  # the sweep folder, at the same path on every node
    name: str  # b<batch>-s<seed>
    args: tuple[str, ...]  # `detector train` options of a new run, without --project and --name
    device: str | None  # --device, the one option a resumed run may change
    sweep: dict  # run.json config.sweep, as the local backend records it


def entry_point() -> list[str]:
    """The installed `detector` beside this Python, else `python -m detector` (the same code either way)."""
    exe = Path(sys.executable).with_name("detector")
    return [str(exe)] if exe.is_file() else [sys.executable, "-m", "detector"]


def is_completed(run_dir: Path) -> bool:
    """True when run_dir holds a run whose run.json says completed."""
    return (run_dir / "run.json").is_file() and Recorder(run_dir).read().get("status") == "completed"


def execute(spec: RunSpec, node: str = "") -> dict:
    """Train spec's run in a new attempt folder and put it in place; return what happened, never raise for it.

    A training that fails or is interrupted is reported in the result (Ray would retry an exception, and a
    bad option fails the same way on every node); a lost worker is what Ray retries.
    """
    folder, name = Path(spec.folder), spec.name
    if is_completed(folder / name):
        return {"name": name, "status": "skipped"}
    attempt = folder / ATTEMPTS / name / f"{platform.node()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    attempt.mkdir(parents=True)
    run_dir, source = attempt / name, continue_from(folder, name, exclude=attempt)
    args = ["train", *spec.args, "--project", str(attempt), "--name", name]
    if source is not None:
        shutil.copytree(source, run_dir, symlinks=True)
        copy = Recorder(run_dir)
        if copy.read().get("status") == "running":  # the copy runs nowhere, whatever the original still does
            copy.update(status="interrupted")
        args = ["train", *TrainConfig(resume=run_dir, device=spec.device).to_argv()]
    write_json_atomic(attempt / ATTEMPT_JSON, {"node": node, "host": platform.node(), "pid": os.getpid(),
                                               "started": time.time(), "resumed_from": str(source or "")})
    if is_completed(run_dir):  # trained to the end before, but its task was lost before putting it in place
        fileio.write_text(attempt / LOG, f"{source} had finished training; put in place without training again\n")
        code = 0
    else:
        code = _train(args, attempt / LOG)
    if code == 0:
        return {"name": name, "status": _promote(folder, name, attempt, spec, node, source), "node": node}
    status = "interrupted" if code == INTERRUPTED_EXIT else "failed"
    return {"name": name, "status": status, "node": node, "error": _why(run_dir, attempt / LOG, code)}


def _train(args: list[str], log: Path) -> int:
    """Run `detector train ARGS` with its output in log; Ctrl-C (Ray's cancel) is passed on to it."""
    with log.open("ab") as out:
        proc = subprocess.Popen([*entry_point(), *args], stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                preexec_fn=_die_with_parent if sys.platform == "linux" else _default_sigint)
        try:
            while True:  # short waits, so an interrupt raised in this thread is seen between them
                try:
                    return proc.wait(timeout=0.5)
                except subprocess.TimeoutExpired:
                    continue
        except BaseException:
            # The training marks its run.json interrupted on SIGINT and exits 130; give it time to.
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
            raise


def _default_sigint() -> None:
    """In the child: take SIGINT and SIGTERM as a shell-started training does.

    A Ray worker blocks SIGINT (it raises KeyboardInterrupt in its own way), and a child inherits
    the signal mask: unblocked, the training sees the SIGINT that _train passes on when Ray cancels.
    """
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM})
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _die_with_parent() -> None:
    """In the child: get SIGTERM when the worker dies (a lost node), so no training outlives its task."""
    import ctypes

    _default_sigint()
    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def continue_from(folder: Path, name: str, exclude: Path | None = None) -> Path | None:
    """The attempt of run `name` to continue: a finished one not yet in place, else the one that got
    furthest (it has weights/last.pt), else None to start anew."""
    candidates = [folder / name] + sorted((folder / ATTEMPTS / name).glob(f"*/{name}"))
    best, key = None, None
    for run_dir in candidates:
        last = run_dir / "weights" / "last.pt"
        if exclude is not None and exclude in run_dir.parents:
            continue
        if is_completed(run_dir):
            return run_dir
        if not last.is_file():
            continue
        k = (epochs_done(run_dir), last.stat().st_mtime)
        if key is None or k > key:
            best, key = run_dir, k
    return best


def epochs_done(run_dir: Path) -> int:
    """Completed epochs: the rows of epochs.csv (the record is written whole rows at a time)."""
    try:
        return max(0, len((run_dir / "epochs.csv").read_text(encoding="utf-8").splitlines()) - 1)
    except OSError:
        return 0


def _promote(folder: Path, name: str, attempt: Path, spec: RunSpec, node: str, source: Path | None) -> str:
    """Record the sweep in the finished run and rename it into place; drop every other attempt of it."""
    run_dir, final = attempt / name, folder / name
    fileio.rename(attempt / LOG, run_dir / LOG)
    recorder = Recorder(run_dir)
    recorder.merge("config", sweep=spec.sweep, project=str(folder))
    recorder.update(placement={"backend": "ray", "node": node, "host": platform.node(),
                               "continued_from": str(source or ""), "placed": now_iso()})
    if is_completed(final):  # another attempt of the same run finished first (a node that came back)
        shutil.rmtree(attempt, ignore_errors=True)
        return "skipped"
    if final.exists():  # an unfinished run of an earlier sweep: the finished one replaces it
        fileio.rename(final, attempt / "replaced")
    fileio.rename(run_dir, final)
    shutil.rmtree(folder / ATTEMPTS / name, ignore_errors=True)
    try:
        (folder / ATTEMPTS).rmdir()
    except OSError:
        pass  # other runs still have attempts
    return "completed"


def _why(run_dir: Path, log: Path, code: int) -> str:
    """One line on why a training did not finish: run.json's error, else the log's last line."""
    if (run_dir / "run.json").is_file() and (error := Recorder(run_dir).read().get("error")):
        return f"{error} (log: {log})"
    lines = [ln.strip() for ln in log.read_text(encoding="utf-8", errors="replace").splitlines() if ln.strip()]
    return f"{lines[-1] if lines else f'exit status {code}'} (log: {log})"


def live(folder: Path, name: str, since: float) -> tuple[int, int] | None:
    """(epochs done, epochs) of the newest attempt of a run started after `since`, or None if none has."""
    newest, started = None, since
    for info in (folder / ATTEMPTS / name).glob(f"*/{ATTEMPT_JSON}"):
        try:
            t = float(json.loads(info.read_text(encoding="utf-8"))["started"])
        except (OSError, ValueError, KeyError):
            continue  # being written, or removed as the run was put in place
        if t >= started:
            newest, started = info.parent / name, t
    if newest is None:
        return None
    try:
        epochs = int(Recorder(newest).read()["config"]["ultralytics"]["epochs"])
    except (OSError, ValueError, KeyError, TypeError):
        epochs = 0  # run.json not written yet: the training is still loading
    return epochs_done(newest), epochs


def probe_storage(probe: str, token: str, node: str, data: str | None) -> str | None:
    """On one node: read the driver's marker, write this node's; None, or why this node cannot take runs."""
    where = Path(probe)
    try:
        seen = (where / "driver").read_text(encoding="utf-8")
    except OSError:
        seen = ""
    if seen != token:
        return f"it does not see {where.parent} (no driver marker there)"
    try:
        fileio.write_text(where / node, token)
    except OSError as e:
        return f"it cannot write to {where.parent}: {e.strerror}"
    if data is not None and not Path(data).exists():
        return f"it does not see the dataset {data}"
    return None
