"""The one way the tool writes a file: a temporary name in the destination's folder, fsync, rename, fsync.

Every file detector writes (run.json, CSV snapshots, checkpoints, exports,
reports, predictions, the weights cache, converted datasets, settings) goes
through here, so each is either the old file or the complete new one, never
part of one: the data goes to a temporary file beside the destination (named
for this process, thread and call, so parallel writers never share one), is
flushed and fsynced, renamed over the destination, and the folder is fsynced so
the rename itself survives a power cut. Any failure removes the temporary file.
A full disk (or quota) raises DiskFull naming the destination: never the
temporary file, never the file being copied from.

Folders are staged the same way: built under a temporary name beside (or inside)
their destination and renamed into place once complete (`staged_dir`, `filling`).
This is the only module that renames files into place (tests/test_layout.py).
"""

from __future__ import annotations

import contextlib
import errno
import io
import itertools
import json
import os
import shutil
import threading
import uuid
from pathlib import Path
from typing import IO, Iterator

from detector.errors import DiskFull, is_disk_full

TMP_SUFFIX = ".tmp"  # every temporary file ends so: `.NAME.<pid>-<thread>-<n>.tmp`
STAGING = ".staging-"  # staged folders: `.staging-<pid>-<hex>` (filling) or `.NAME.staging-<pid>-<hex>`
_NAME_MAX = 255
_calls = itertools.count()


def temp_name(path: Path, suffix: str = TMP_SUFFIX) -> Path:
    """A temporary file name beside path, unique to this process, thread and call."""
    path = Path(path)
    tail = f".{os.getpid()}-{threading.get_ident() % 10**8}-{next(_calls)}{suffix}"
    name = path.name[: _NAME_MAX - len(tail) - 1]
    return path.with_name(f".{name}{tail}")


def disk_full(path: Path, error: BaseException | None = None) -> DiskFull:
    """The typed error for a full disk while writing path (error: the OSError seen, for its errno)."""
    code = getattr(error, "errno", None) if isinstance(error, OSError) else None
    return DiskFull(f"disk full while writing {path}; free space and retry", filename=str(path),
                    errno_code=code if code in (errno.ENOSPC, errno.EDQUOT) else errno.ENOSPC)


def _typed(error: BaseException, path: Path, ours: bool = True) -> BaseException:
    """error as the caller should see it: DiskFull naming path; an OSError of our own write renamed to path.

    ours=False: the error came from the caller's code inside a `with` block (reading a
    source, say), so only a full disk is retyped and its file names stay as they are.
    """
    if isinstance(error, DiskFull):
        return error
    if is_disk_full(error):
        return disk_full(path, error)
    if ours and isinstance(error, OSError):
        error.filename = str(path)  # name the file the user knows, not the temporary one
        error.filename2 = None
    return error


def _raise(error: BaseException, path: Path, ours: bool = True, staged: Path | None = None):
    """Raise error typed for path; a DiskFull naming a file inside the staging folder staged names it under path."""
    if isinstance(error, DiskFull) and staged is not None and error.filename:
        with contextlib.suppress(ValueError):
            raise disk_full(path / Path(error.filename).relative_to(staged), error) from error
    typed = _typed(error, path, ours)
    if typed is error:
        raise error
    raise typed from error


@contextlib.contextmanager
def atomic(path: str | Path, mode: str = "wb", encoding: str | None = None,
           newline: str | None = None, suffix: str = TMP_SUFFIX) -> Iterator[IO]:
    """A file object whose content replaces path only when the `with` block completes.

    An exception in the block (or in the write itself) leaves path as it was and
    removes the temporary file. mode is "wb", "w+b" (to read back what was written, for a check
    before the rename) or "w" (text: encoding defaults to UTF-8). suffix ends the temporary
    file's name (".part" for a download).
    """
    if mode not in ("w", "wb", "w+b"):
        raise ValueError(f"atomic() writes whole files: mode 'w', 'wb' or 'w+b', not {mode!r}")
    path = Path(path)
    tmp = temp_name(path, suffix)
    text = {"encoding": encoding or "utf-8", "newline": newline} if mode == "w" else {}
    in_block = False
    try:
        with open(tmp, mode, **text) as f:
            in_block = True
            yield f
            in_block = False
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            tmp.unlink()
        _raise(e, path, ours=not in_block)
    fsync_dir(path.parent)


def write_bytes(path: str | Path, data: bytes) -> Path:
    """Replace path with data, atomically."""
    with atomic(path, "wb") as f:
        f.write(data)
    return Path(path)


def write_text(path: str | Path, text: str, encoding: str = "utf-8") -> Path:
    """Replace path with text, atomically."""
    with atomic(path, "w", encoding=encoding, newline="") as f:
        f.write(text)
    return Path(path)


def write_json(path: str | Path, obj, indent: int | None = 2) -> Path:
    """Replace path with obj as JSON (and a final newline), atomically; values JSON lacks are written as str."""
    return write_text(path, json.dumps(obj, indent=indent, default=str) + "\n")


def copy_file(source: str | Path, dest: str | Path) -> Path:
    """Copy source's bytes to dest, atomically; a full disk names dest."""
    with atomic(dest, "wb") as f, open(source, "rb") as src:
        shutil.copyfileobj(src, f, 1 << 20)
    return Path(dest)


def encode_image(path: str | Path, image) -> Path:
    """Write an image (a BGR array) encoded in memory for path's suffix (PNG when OpenCV cannot), atomically.

    Encoding in memory keeps libpng's own error lines off the terminal when the disk is full.
    Returns the path written (a .png beside path for a suffix OpenCV cannot write).
    """
    import cv2

    path = Path(path)
    try:
        ok, buffer = cv2.imencode(path.suffix or ".png", image)
    except cv2.error:
        ok = False
    if not ok:
        path = path.with_suffix(".png")
        ok, buffer = cv2.imencode(".png", image)
    return write_bytes(path, buffer.tobytes())


def save_figure(fig, path: str | Path, **savefig) -> Path:
    """A matplotlib figure saved as path's format, atomically."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format=Path(path).suffix.lstrip(".") or "png", **savefig)
    return write_bytes(path, buffer.getvalue())


def fsync_dir(folder: str | Path) -> None:
    """fsync a folder, so the renames in it reach the disk (a power cut could bring back the old names)."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _fsync_tree(folder: Path) -> None:
    for root, _dirs, files in os.walk(folder):
        for name in files:
            p = os.path.join(root, name)
            if os.path.islink(p):
                continue
            fd = os.open(p, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(root)


def rename(source: str | Path, dest: str | Path) -> Path:
    """Rename a complete file into place (fsynced first, replacing dest), or a folder onto a free name.

    For a file another library wrote under a temp_name (torch.save to a path, say); a
    full disk names dest.
    """
    source, dest = Path(source), Path(dest)
    try:
        if source.is_file() and not source.is_symlink():
            with open(source, "rb") as f:
                os.fsync(f.fileno())
        os.replace(source, dest)
    except OSError as e:
        raise _typed(e, dest) from None
    fsync_dir(dest.parent)
    return dest


def replace_dir(tmp_dir: str | Path, final_dir: str | Path, durable: bool = True) -> Path:
    """Put the complete folder tmp_dir in place as final_dir, replacing what was there.

    The files are fsynced first (durable), then the old folder is moved aside, the new one
    renamed into place and the old one removed: a kill leaves the old folder or the new one
    (the old one under a hidden name beside it only between two renames).
    """
    tmp_dir, final_dir = Path(tmp_dir), Path(final_dir)
    try:
        if durable:
            _fsync_tree(tmp_dir)
        old = None
        if final_dir.is_symlink() or final_dir.is_file():
            final_dir.unlink()
        elif final_dir.exists():
            old = final_dir.with_name(f".{final_dir.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.old")
            os.replace(final_dir, old)
        os.replace(tmp_dir, final_dir)
    except OSError as e:
        raise _typed(e, final_dir) from None
    fsync_dir(final_dir.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return final_dir


def move_into(item: str | Path, folder: str | Path) -> Path:
    """Move a file or folder into folder under its own name, replacing one of the same name."""
    item, folder = Path(item), Path(folder)
    target = folder / item.name
    if item.is_dir() and not item.is_symlink():
        return replace_dir(item, target)
    if target.is_dir() and not target.is_symlink():
        shutil.rmtree(target)
    return rename(item, target)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _staging_pid(name: str) -> int | None:
    """The process that made a staging folder, from its name (None when the name is not one of ours)."""
    _, sep, tail = name.partition(STAGING)
    pid = tail.split("-", 1)[0]
    return int(pid) if sep and pid.isdigit() else None


def remove_stale(folder: str | Path) -> list[Path]:
    """Remove staging folders and temporary files that a killed process of this host left in folder."""
    folder, removed = Path(folder), []
    if not folder.is_dir():
        return removed
    for p in folder.iterdir():
        if not p.name.startswith("."):
            continue
        if STAGING in p.name:
            pid = _staging_pid(p.name)
        elif p.name.endswith(TMP_SUFFIX) or p.name.endswith(".old"):
            head = p.name.rsplit(".", 2)[-2] if p.name.count(".") >= 2 else ""
            pid = int(head.split("-")[0]) if head.split("-")[0].isdigit() else None
        else:
            continue
        if pid is None or pid == os.getpid() or _pid_alive(pid):
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                p.unlink()
        removed.append(p)
    return removed


def staging_name(folder: str | Path, name: str = "") -> Path:
    """A new staging folder's path in folder: hidden, and named for this process (see remove_stale)."""
    return Path(folder) / f".{name + '.' if name else ''}{STAGING.lstrip('.')}{os.getpid()}-{uuid.uuid4().hex[:8]}"


@contextlib.contextmanager
def staged_dir(final_dir: str | Path, durable: bool = True) -> Iterator[Path]:
    """A temporary folder beside final_dir that replaces final_dir when the `with` block completes.

    On any exception the temporary folder is removed and final_dir is left as it was.
    """
    final_dir = Path(final_dir)
    final_dir.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(final_dir.parent)
    tmp = staging_name(final_dir.parent, final_dir.name)
    try:
        tmp.mkdir()
        yield tmp
        replace_dir(tmp, final_dir, durable=durable)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        _raise(e, final_dir, ours=False, staged=tmp)


@contextlib.contextmanager
def filling(out_dir: str | Path) -> Iterator[Path]:
    """A staging folder inside out_dir whose files are moved into out_dir when the `with` block completes.

    For commands that add files to a folder the user names (predict, compare): on any
    exception nothing of this command stays behind (not its staging folder, and not
    out_dir or its parents if this call created them); earlier files in out_dir are kept.
    """
    out_dir = Path(out_dir)
    created = [p for p in [out_dir, *out_dir.parents] if not p.exists()]
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise _typed(e, out_dir) from None
    remove_stale(out_dir)
    tmp = staging_name(out_dir)
    try:
        tmp.mkdir()
        yield tmp
        _fsync_tree(tmp)
        for item in sorted(tmp.iterdir()):
            _merge(item, out_dir / item.name)
        shutil.rmtree(tmp, ignore_errors=True)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        for p in created:  # deepest first: only folders this call made, and only when empty
            with contextlib.suppress(OSError):
                p.rmdir()
        _raise(e, out_dir, ours=False, staged=tmp)


def _merge(item: Path, target: Path) -> None:
    """Move item onto target: a file replaces a file; a folder's files are merged into the folder there."""
    if item.is_dir() and not item.is_symlink() and target.is_dir() and not target.is_symlink():
        for child in sorted(item.iterdir()):
            _merge(child, target / child.name)
        return
    if target.is_dir() and not target.is_symlink():
        shutil.rmtree(target)
    os.replace(item, target)
    fsync_dir(target.parent)
