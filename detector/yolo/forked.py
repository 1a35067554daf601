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
import sys


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
            import torch

            torch.set_num_threads(1)  # the parent's OpenMP pool does not survive fork
            payload = pickle.dumps(("ok", fn(*second)), protocol=pickle.HIGHEST_PROTOCOL)
        except BaseException as e:  # noqa: BLE001  (anything: the parent redoes the call itself)
            payload, code = pickle.dumps(("error", repr(e))), 1
        with os.fdopen(write, "wb") as out:
            out.write(payload)
        os._exit(code)
    os.close(write)
    try:
        a = fn(*first)
    finally:
        with os.fdopen(read, "rb") as inp:
            data = inp.read()
        os.waitpid(pid, 0)
    try:
        status, b = pickle.loads(data)
    except (pickle.UnpicklingError, EOFError, ValueError):
        status = "error"
    return (a, b) if status == "ok" else (a, fn(*second))
