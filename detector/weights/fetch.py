"""Download one weights file: temporary file, size and archive check, then rename into place (nothing half-written).

The only code in the tool that opens a network connection, and only when the
user asked (--download, DETECTOR_DOWNLOAD=1, `detector weights fetch`). Uses
the standard library's urllib (no extra dependency). Every failure is one
WeightsError line and leaves no file behind: a 404, a transfer cut short (the
byte count must equal the Content-Length the server announced, and the body must
be a whole PyTorch archive, announced or not), Ctrl-C, a machine that cannot
reach the server. A full disk is DiskFull naming the cache file.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import socket
import sys
import time
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from detector import fileio
from detector.errors import DetectorError, DiskFull

CHUNK = 1 << 16
TIMEOUT_S = 30  # per socket operation: a stalled server fails instead of hanging forever
ZIP_MAGIC = b"PK"  # torch.save writes a zip archive; anything else (an HTML error page) is not weights


class WeightsError(DetectorError):
    """Weights that cannot be found in the cache or downloaded."""


class DownloadInterrupted(WeightsError):
    """Ctrl-C during a download; nothing was written to the cache."""

    exit_code = 130


@dataclass(frozen=True)
class Downloaded:
    """What a completed download wrote and where it came from."""

    path: Path
    url: str
    size: int
    sha256: str


def download(url: str, dest: Path, progress=None) -> Downloaded:
    """Fetch url into dest (via dest's folder's temporary file); progress(done, total) after every chunk.

    dest appears only once the body is complete and checked: its size where the server
    announced one, and a readable PyTorch archive (every member's CRC) in every case.
    """
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        with fileio.atomic(dest, "w+b", suffix=".part") as f:  # complete and checked before the rename, or no file at all
            size, digest = _transfer(url, f, dest, progress)
            _check_archive(f, url, size)
    except DiskFull:
        raise
    except OSError as e:  # the cache folder itself: no permission, not a folder
        raise WeightsError(f"cannot write {dest.name} into {dest.parent}: {e.strerror or e}") from None
    except KeyboardInterrupt:
        raise DownloadInterrupted(f"download of {dest.name} interrupted (Ctrl-C); nothing was written to "
                                  f"{dest.parent}") from None
    return Downloaded(path=dest, url=url, size=size, sha256=digest)


def _transfer(url: str, f, dest: Path, progress) -> tuple[int, str]:
    """Stream url into the file f; return (bytes, sha256). WeightsError when the body is not what was announced."""
    name, host = dest.name, urlsplit(url).netloc or url
    try:
        response = urllib.request.urlopen(urllib.request.Request(url, headers={"User-Agent": "detector"}),
                                          timeout=TIMEOUT_S)
    except urllib.error.HTTPError as e:
        raise WeightsError(f"cannot download {name}: {url} answered HTTP {e.code} {e.reason}; check the name "
                           "(or DETECTOR_WEIGHTS_URL)") from None
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise WeightsError(f"cannot reach {host} to download {name} ({_why(reason)}); on an offline machine copy the "
                           f"file into {dest.parent} or set DETECTOR_WEIGHTS_URL to a reachable mirror") from None
    with response:
        total = int(response.headers.get("Content-Length") or 0) or None
        done, digest = 0, hashlib.sha256()
        try:
            while chunk := response.read(CHUNK):
                f.write(chunk)
                digest.update(chunk)
                done += len(chunk)
                if progress:
                    progress(done, total)
        except (http.client.IncompleteRead, ConnectionError, socket.timeout) as e:
            raise WeightsError(f"download of {name} from {host} broke off after {done} of {total or '?'} bytes "
                               f"({_why(e)}); nothing was written, try again") from None
    if total is not None and done != total:
        raise WeightsError(f"download of {name} from {host} is incomplete: {done} of {total} bytes; nothing was "
                           "written, try again")
    return done, digest.hexdigest()


def _check_archive(f, url: str, size: int) -> None:
    """WeightsError unless f holds a whole PyTorch archive: torch.save's zip, every member's CRC intact.

    A body cut short without a Content-Length reads as a complete download; its zip has
    no central directory (that comes last), so it fails here, before any name exists.
    """
    name = url.rsplit("/", 1)[-1]
    f.flush()
    f.seek(0)
    if f.read(2) != ZIP_MAGIC:
        raise WeightsError(f"{url} did not send a PyTorch weights file (got {size} bytes of something else); "
                           "check the name (or DETECTOR_WEIGHTS_URL)")
    f.seek(0)
    try:
        with zipfile.ZipFile(f) as archive:
            bad = archive.testzip()
            members = archive.namelist()
    except (zipfile.BadZipFile, EOFError, OSError, ValueError) as e:
        bad, members = f"({e})", []
    if bad is not None or not any(m.endswith("data.pkl") for m in members):
        raise WeightsError(f"download of {name} from {urlsplit(url).netloc or url} is not a complete PyTorch "
                           f"archive ({size} bytes, damaged or cut short); nothing was written, try again")
    f.seek(0, os.SEEK_END)


def _why(reason) -> str:
    if isinstance(reason, ConnectionRefusedError):
        return "connection refused"
    if isinstance(reason, socket.gaierror):
        return "host name not found"
    if isinstance(reason, (socket.timeout, TimeoutError)):
        return "timed out"
    if isinstance(reason, http.client.IncompleteRead):
        return "connection closed early"
    return str(reason).strip() or type(reason).__name__


class ProgressBar:
    """A one-line progress bar on stderr: redrawn in place on a terminal, every 25% otherwise."""

    def __init__(self, name: str, stream=None):
        self.name, self.stream = name, stream or sys.stderr
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self._shown, self._last = 0, 0.0

    def __call__(self, done: int, total: int | None) -> None:
        pct = int(done * 100 / total) if total else None
        now = time.monotonic()
        if self.tty and (now - self._last > 0.1 or done == total):
            self._last = now
            self.stream.write("\r" + self.line(done, total))
            if done == total:
                self.stream.write("\n")
        elif not self.tty and pct is not None and pct // 25 > self._shown:  # a log gets 25%, 50%, 75%, 100%
            self._shown = pct // 25
            self.stream.write(self.line(done, total) + "\n")
        self.stream.flush()

    def line(self, done: int, total: int | None) -> str:
        mb = f"{done / 2**20:.1f}" + (f"/{total / 2**20:.1f} MB" if total else " MB")
        if not total:
            return f"  {self.name}: {mb}"
        filled = int(30 * done / total)
        return f"  {self.name}: [{'#' * filled}{'.' * (30 - filled)}] {done * 100 // total:3d}% {mb}"
