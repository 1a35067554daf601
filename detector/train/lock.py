"""One process per run folder: an exclusive lock that dies with the process that holds it.

A resume that runs beside the training it resumes lets both write the same
files (the CSVs rewritten under the first, two rows of one epoch). The lock is
fcntl.flock on `.lock` in the run folder: the kernel releases it when the holder
exits, however it exits (SIGKILL included), so a stale lock never blocks a
resume and two resumes cannot race.
"""

from __future__ import annotations

import os
import platform
from pathlib import Path

from detector.errors import RunDirError
from detector.record.runs import process_gone

LOCK_NAME = ".lock"


class RunLock:
    """Hold the run folder's lock for the life of this process (or until release())."""

    def __init__(self, run_dir: Path, what: str = "run"):
        self.path = Path(run_dir) / LOCK_NAME
        self.what = what  # run or sweep, for the message
        self._fd: int | None = None

    def acquire(self) -> "RunLock":
        """Take the lock, or raise RunDirError saying which process holds the run."""
        import fcntl

        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise RunDirError(f"{self.what} {self.path.parent} is in use by {holder}; wait for it to end or stop it "
                              "(Ctrl-C, or kill -INT PID) and retry") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {platform.node()}\n".encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor releases the flock
            self._fd = None

    def __del__(self):  # an error between acquire and release must not keep the folder locked in this process
        self.release()

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> bool:
        self.release()
        return False


def refuse_if_live(run_dir: Path, state: dict) -> None:
    """Refuse a resume while run.json says the run is running in a process still alive on this host."""
    pid = state.get("pid")
    if state.get("status") != "running" or not isinstance(pid, int) or pid == os.getpid():
        return
    if state.get("host") == platform.node() and not process_gone(state) and _is_detector(pid):
        raise RunDirError(f"run {run_dir} is still training in process {pid} on this host; wait for it to end or "
                          f"stop it (Ctrl-C, or kill -INT {pid}) before resuming")


def _is_detector(pid: int) -> bool:
    """Whether pid looks like a detector process (a reused pid of another program is not one)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return True  # no /proc (macOS): the pid is alive, trust it
    return b"detector" in cmdline or b"python" in cmdline
