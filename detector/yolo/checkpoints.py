"""Checkpoints written atomically, read defensively.

Ultralytics writes weights/last.pt and best.pt in place (Path.write_bytes,
torch.save), so a kill or a full disk during the write leaves a torn file where a
good one was. Here every checkpoint goes to a temporary file in the same folder,
is fsynced and then renamed over the old one: a reader sees the old file or the
new one, never part of one.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from detector import fileio

TMP_SUFFIX = fileio.TMP_SUFFIX


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """Replace path with data: temp file, fsync, rename (the old file stays whole if anything fails)."""
    fileio.write_bytes(path, data)


def save_atomic(obj, path: Path) -> None:
    """torch.save(obj, path), atomically."""
    import io

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    write_bytes_atomic(path, buffer.getvalue())


class AtomicTarget(type(Path())):
    """A Path whose write_bytes is atomic: handed to Ultralytics' save_model in place of trainer.last/best."""

    def write_bytes(self, data) -> int:
        write_bytes_atomic(Path(self), bytes(data))
        return len(data)


def remove_stale_temps(folder: Path) -> list[Path]:
    """Delete temporary checkpoint files a killed process left in folder; return them."""
    stale = sorted(Path(folder).glob(f".*{TMP_SUFFIX}")) if Path(folder).is_dir() else []
    for p in stale:
        with contextlib.suppress(OSError):
            p.unlink()
    return stale


def read_checkpoint(path: Path) -> dict | None:
    """The checkpoint dict at path, or None when it is missing, torn or not an Ultralytics checkpoint."""
    from ultralytics.utils.patches import torch_load

    try:
        ckpt = torch_load(path, map_location="cpu")
    except Exception:  # a torn or foreign file: the caller decides what was lost
        return None
    return ckpt if isinstance(ckpt, dict) and ("ema" in ckpt or "model" in ckpt) else None


def strip_atomic(path: Path, updates: dict | None = None) -> dict:
    """Ultralytics' strip_optimizer (final weights: EMA model in half precision, no optimizer), written atomically."""
    from ultralytics.utils.torch_utils import strip_optimizer

    path = Path(path)
    tmp = fileio.temp_name(path)
    try:
        out = strip_optimizer(path, s=str(tmp), updates=updates)
        if out:
            fileio.rename(tmp, path)  # fsynced, then renamed over path
    except Exception as e:  # torch.save says ENOSPC inside a RuntimeError's text
        if fileio.is_disk_full(e) and not isinstance(e, fileio.DiskFull):
            raise fileio.disk_full(path, e) from e
        raise
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()
    return out
