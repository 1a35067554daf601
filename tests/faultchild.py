"""Run `detector ARGS...` and kill this very process at one phase: the fault injection of tests/test_faults.py.

    python tests/faultchild.py PHASE MODE -- train --data ... (or: train --resume RUN)

PHASE is where the process dies: check (the dataset check), first_iteration,
mid_epoch:E (after the 2nd iteration of epoch E), validation:E (as epoch E's
validation starts), checkpoint_write:K (inside the K-th write of last.pt, after
the data reached the temporary file, before the rename), after_checkpoint:K
(just after the K-th last.pt is in place), final (in the final validation, after
last.pt and best.pt were stripped); for any command, fsync:NAME (after the data of
a file whose name holds NAME reached its temporary file, before the rename) and
onnx_save (half-way through the exporter's write of the .onnx file). MODE is kill (SIGKILL: no handler runs) or
int (SIGINT: Ctrl-C). Epoch and write counts are of this process only. Nothing
here ships: the faults are patched in from outside.
"""

from __future__ import annotations

import os
import signal
import sys


def die(mode: str) -> None:
    # SIGINT becomes KeyboardInterrupt at the main thread's next bytecode, as a real Ctrl-C would.
    os.kill(os.getpid(), signal.SIGKILL if mode == "kill" else signal.SIGINT)


def install(phase: str, mode: str) -> None:
    name, _, arg = phase.partition(":")
    n = int(arg) if arg.isdigit() else 0
    if name == "check":
        from detector.data import check

        check.require_trainable = lambda *a, **k: die(mode)
        return
    if name == "fsync":  # inside the write of a file whose name holds ARG: its data written, not yet renamed
        _fsync_fault(arg, mode)
        return
    if name == "onnx_save":  # half of the .onnx file written by the exporter's final onnx.save
        _onnx_save_fault(mode)
        return
    from detector.yolo import callbacks, checkpoints, recording

    if name == "first_iteration":
        original = recording.RecordingTrainer.preprocess_batch

        def preprocess_batch(self, batch):
            die(mode)
            return original(self, batch)

        recording.RecordingTrainer.preprocess_batch = preprocess_batch
    elif name == "mid_epoch":
        original = callbacks.IterationRows.on_train_batch_end

        def on_train_batch_end(self, t):
            original(self, t)
            if self.p.epoch == n and self.p.epoch_rows == 2:
                die(mode)

        callbacks.IterationRows.on_train_batch_end = on_train_batch_end
    elif name == "validation":
        original = recording.RecordingTrainer.validate

        def validate(self):
            if self.epoch + 1 == n:
                die(mode)
            return original(self)

        recording.RecordingTrainer.validate = validate
    elif name in ("checkpoint_write", "after_checkpoint"):
        _checkpoint_fault(checkpoints, name, n, mode)
    elif name == "final":
        original = checkpoints.strip_atomic
        calls = []

        def strip_atomic(path, updates=None):
            out = original(path, updates)
            calls.append(path)
            if len(calls) == 2:  # last.pt and best.pt stripped, best.pt about to be validated
                die(mode)
            return out

        checkpoints.strip_atomic = strip_atomic
    else:
        raise SystemExit(f"unknown phase {phase}")


def _fsync_fault(part: str, mode: str) -> None:
    real = os.fsync

    def fsync(fd):
        real(fd)
        if part in os.readlink(f"/proc/self/fd/{fd}").rsplit("/", 1)[-1]:
            die(mode)

    os.fsync = fsync


def _onnx_save_fault(mode: str) -> None:
    import onnx

    def save(model, f, *args, **kwargs):
        data = model.SerializeToString()
        with open(f, "wb") as out:
            out.write(data[: len(data) // 2])
            out.flush()
        die(mode)

    onnx.save = save


def _checkpoint_fault(checkpoints, name: str, n: int, mode: str) -> None:
    original = checkpoints.write_bytes_atomic
    writes = []

    class DyingOs:
        """os for detector.fileio (which writes checkpoints) whose fsync kills the process: the temp file is
        written, not yet renamed."""

        def __getattr__(self, attr):
            return getattr(os, attr)

        @staticmethod
        def fsync(fd):
            os.fsync(fd)
            die(mode)

    def write_bytes_atomic(path, data):
        if path.name != "last.pt":
            return original(path, data)
        writes.append(path)
        if name == "checkpoint_write" and len(writes) == n:
            from detector import fileio

            fileio.os = DyingOs()
        original(path, data)
        if name == "after_checkpoint" and len(writes) == n:
            die(mode)

    checkpoints.write_bytes_atomic = write_bytes_atomic


if __name__ == "__main__":
    phase, mode, sep, *args = sys.argv[1:]
    assert sep == "--", __doc__
    install(phase, mode)
    from detector.cli import main

    main(args, prog_name="detector")
