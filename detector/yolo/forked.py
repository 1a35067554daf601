"""Two independent calls at once: the second in a forked copy of this process.

The memory model's two reference traces cost seconds each, all of it Python in the
fake-tensor dispatcher, so threads would not overlap them; a forked child does, on a
second core, and starts with the built model already in its memory (copy on write).
The child returns its result pickled through a pipe. Where fork is not the platform's
way (Windows, macOS) or the child fails, the calls run one after the other here.
"""

from __future__ import annotations

import os
import pickle
import select
import signal
import sys
import time


def both(fn, first: tuple, second: tuple) -> tuple:
    """(fn(*first), fn(*second)), the second computed in a forked child where possible."""
    if not sys.platform.startswith("linux") or (os.cpu_count() or 1) < 2:
        return fn(*first), fn(*second)
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: compute, send, leave without running the parent's exit handlers
        os.close(read)
        code = 0
        try:
            import logging

            import torch

            # Only the parent speaks: a notebook kernel's output streams and log handlers belong to threads
            # that a forked child does not have.
            logging.disable(logging.CRITICAL)
            sys.stdout = sys.stderr = open(os.devnull, "w")  # noqa: SIM115  (the child ends with os._exit)
            torch.set_num_threads(1)  # the parent's OpenMP pool does not survive fork
            payload = pickle.dumps(("ok", fn(*second)), protocol=pickle.HIGHEST_PROTOCOL)
        except BaseException as e:  # noqa: BLE001  (anything: the parent redoes the call itself)
            payload, code = pickle.dumps(("error", repr(e))), 1
        with os.fdopen(write, "wb") as out:
            out.write(payload)
        os._exit(code)
    os.close(write)
    started = time.monotonic()
    try:
        a = fn(*first)
    finally:
        # The child does the same work as the parent: one that is still silent long after is stuck (a lock
        # some other thread held at the fork), and is stopped; the parent then does the call itself.
        data = _collect(read, pid, deadline=time.monotonic() + max(30.0, 2 * (time.monotonic() - started)))
    try:
        status, b = pickle.loads(data)
    except (pickle.UnpicklingError, EOFError, ValueError):
        status = "error"
    return (a, b) if status == "ok" else (a, fn(*second))


def _collect(read: int, pid: int, deadline: float) -> bytes:
    """Everything the child writes until it closes the pipe, or b"" (and the child killed) past the deadline."""
    chunks = []
    with os.fdopen(read, "rb", buffering=0) as inp:
        while True:
            ready, _, _ = select.select([inp], [], [], max(deadline - time.monotonic(), 0))
            if not ready:
                os.kill(pid, signal.SIGKILL)
                chunks = []
                break
            chunk = inp.read(1 << 20)
            if not chunk:
                break
            chunks.append(chunk)
    os.waitpid(pid, 0)
    return b"".join(chunks)
