"""One rule for the paths a command reads and writes, checked before anything is written.

A command never writes into its inputs (images, dataset folders, weights it
reads), into a dataset, or into another run's folder. Every command that writes
calls `check_writes` with the folders it will write into and the inputs it reads
before it creates anything, so a refused command leaves nothing behind.

File names that are not valid UTF-8 (bytes Python keeps as surrogates) are
refused with one line naming the file: OpenCV crashes on them and JSON, CSV and
terminals cannot carry them faithfully.
"""

from __future__ import annotations

from pathlib import Path

from detector.errors import UsageError

RUN_MARKER = "run.json"  # a folder holding it is a run folder (docs/run-folder.md)


def shown(path) -> str:
    """path as text that any terminal and file can carry: undecodable bytes become U+FFFD."""
    return str(path).encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def is_utf8(path) -> bool:
    try:
        str(path).encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def require_utf8(path, error=UsageError, what: str = "file") -> None:
    """Refuse a path whose name is not valid UTF-8, naming it."""
    if not is_utf8(path):
        raise error(f"{what} name {shown(path)!r} is not valid UTF-8; rename it (for example with convmv) and retry")


def _real(path) -> Path:
    return Path(path).expanduser().resolve()


def _within(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def enclosing_run(path) -> Path | None:
    """The run folder that path is or lies inside (the nearest folder upward holding run.json), else None."""
    p = _real(path)
    for folder in (p, *p.parents):
        if (folder / RUN_MARKER).is_file():
            return folder
    return None


def enclosing_dataset(path) -> Path | None:
    """The YOLO dataset folder that path lies in: the nearest folder upward with images/ and labels/, else None."""
    p = _real(path)
    for folder in (p, *p.parents):
        if (folder / "images").is_dir() and (folder / "labels").is_dir():
            return folder
    return None


def check_writes(written, inputs=(), what: str = "--out", allow_run=None, dataset_ok: bool = False) -> None:
    """Refuse (UsageError) before anything is written when a folder in `written` is an input or lies inside one,
    lies inside a dataset (unless dataset_ok: `datasets convert` writes one), or lies inside a run folder other
    than allow_run. `written` names the folders the command writes files into (the files' own folders)."""
    ins = [_real(i) for i in inputs if i is not None]
    for w in (_real(x) for x in written):
        require_utf8(w, what=what)
        for i in ins:
            if _within(w, i):
                raise UsageError(f"{what} {shown(w)} would write into the input {shown(i)}; choose a folder outside it")
        data = None if dataset_ok else enclosing_dataset(w)
        if data is not None:
            raise UsageError(f"{what} {shown(w)} lies inside the dataset {shown(data)}, which is only ever read; "
                             "choose a folder outside it")
        run = enclosing_run(w)
        if run is not None and run != (_real(allow_run) if allow_run is not None else None):
            raise UsageError(f"{what} {shown(w)} lies inside the run folder {shown(run)}; choose a folder outside "
                             "any run (for example beside it)")
