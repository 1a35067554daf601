"""Typed errors: library code raises these; only cli.py turns them into exit messages.

Each message is one sentence that says what is wrong and how to fix it.
"""

from __future__ import annotations


class DetectorError(Exception):
    """Base class of every error the tool reports to the user as one line."""

    exit_code = 1


class UsageError(DetectorError):
    """An option or argument that cannot work (bad value, conflicting options)."""

    exit_code = 2


class DatasetError(DetectorError):
    """A dataset that is missing, malformed or unusable for training."""


class ModelError(DetectorError):
    """A model definition or weights file that cannot be loaded offline."""


class RunDirError(DetectorError):
    """A run folder that is missing, not a run, already exists or cannot be written."""


class BatchError(DetectorError):
    """No batch size fits, or a batch setting is invalid."""


class AugmentError(DetectorError):
    """An augmentation pipeline that cannot be loaded or used for detection."""


class ExportError(DetectorError):
    """An export that failed, or whose outputs do not match the PyTorch model."""


class ImageError(DetectorError):
    """An image that cannot be read, or an image source (folder, glob) that holds no images."""


class TrainingInterrupted(DetectorError):
    """Training was stopped by Ctrl-C or SIGTERM; the run folder says how far it got."""

    exit_code = 130


class DeviceOutOfMemory(BatchError):
    """The device ran out of memory during training; carries where, so training can step down and resume."""

    def __init__(self, message: str, *, batch: int, epoch: int | None, iteration: int | None,
                 epoch_iteration: int | None, phase: str):
        super().__init__(message)
        self.batch, self.epoch, self.iteration = batch, epoch, iteration
        self.epoch_iteration, self.phase = epoch_iteration, phase


class DiskFull(DetectorError, OSError):
    """No space left on the device (or quota) while writing a file; filename names the destination.

    Also an OSError with errno ENOSPC (or EDQUOT), so code that handles a full disk as an
    OSError (is_disk_full, a cache that may fail to write) treats it as one.
    """

    def __init__(self, message: str, filename: str | None = None, errno_code: int | None = None):
        import errno

        OSError.__init__(self, errno_code or errno.ENOSPC, "No space left on device", filename)
        self.message = message

    def __str__(self) -> str:
        return self.message

    def __reduce__(self):  # picklable across processes (Ray), with its message and destination
        return type(self), (self.message, self.filename, self.errno)


def is_disk_full(error: BaseException | None) -> bool:
    """True for 'no space left on device' (or quota) errors anywhere in error's chain of causes."""
    import errno

    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if "No space left on device" in str(error):  # torch.save reports ENOSPC inside a RuntimeError's text
            return True
        error = error.__cause__ or error.__context__
    return False
