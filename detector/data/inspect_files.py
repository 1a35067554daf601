"""Per-file checks of a YOLO dataset: one image file, one label file, one label line, each a list of Problems.

Each image file is read once (content hash, structure check, JPEG end marker, a
reduced-size decode that still reads every byte); label files are parsed with
plain string splitting. detector.data.check runs these over a whole dataset.
"""

from __future__ import annotations

import hashlib
import io
import math
from dataclasses import dataclass
from pathlib import Path

EDGE_TOLERANCE = 1e-3  # normalized; label files round to 6 decimals, so 5e-7 overshoots are noise
MIN_IMAGE_SIDE = 10  # Ultralytics drops smaller images as corrupt


@dataclass(frozen=True)
class Problem:
    """One finding: its severity, a short kind, the file (and line) it is in, and what to do."""

    severity: str  # "error" or "warning"
    kind: str
    file: str
    message: str
    line: int | None = None

    def where(self, root: Path | None = None) -> str:
        """file:line, relative to root when the file lies under it."""
        path = self.file
        if root is not None:
            try:
                path = str(Path(self.file).relative_to(root))
            except ValueError:
                pass
        return f"{path}:{self.line}" if self.line else path




@dataclass(frozen=True)
class _Image:
    """What one image file is: its content hash and size, or the problem reading it."""

    path: str
    sha1: str | None
    size: tuple[int, int] | None
    problem: Problem | None


def inspect_image(path: str) -> _Image:
    """Read an image once: hash it, verify its structure and decode it at reduced size."""
    from PIL import Image

    try:
        data = Path(path).read_bytes()
    except OSError as e:
        return _Image(path, None, None, Problem("error", "image", path, f"cannot be read: {e.strerror or e}"))
    digest = hashlib.sha1(data).hexdigest()
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.verify()  # structure and (for PNG) chunk checksums, without decoding
        with Image.open(io.BytesIO(data)) as im:
            size, fmt = im.size, im.format
            if fmt == "JPEG":
                im.draft("RGB", (max(1, size[0] // 8), max(1, size[1] // 8)))  # DCT scaling: fast, still reads all data
            im.load()  # raises on truncated data (PIL's LOAD_TRUNCATED_IMAGES is off)
    except Exception as e:  # PIL raises many types for broken files
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        return _Image(path, digest, None, Problem("error", "image", path, f"unreadable, truncated or corrupt image ({msg})"))
    if min(size) < MIN_IMAGE_SIDE:
        return _Image(path, digest, size, Problem("error", "image", path,
                                                  f"image is {size[0]}x{size[1]} px; Ultralytics drops images under "
                                                  f"{MIN_IMAGE_SIDE} px"))
    if fmt == "JPEG" and data[-2:] != b"\xff\xd9":
        return _Image(path, digest, size, Problem("warning", "jpeg-end", path,
                                                  "JPEG lacks its end marker; Ultralytics rewrites such files in place"))
    return _Image(path, digest, size, None)


def parse_label(path: Path, nc: int) -> tuple[list[tuple[int, float, float]] | None, list[Problem], bool]:
    """Parse one label file into (class, w, h) boxes, the problems of its lines, and whether it has any line.

    The boxes are None when the file does not exist (a background image, like an empty file).
    """
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None, [], False
    except (OSError, UnicodeDecodeError) as e:
        return [], [Problem("error", "label", str(path), f"label file cannot be read as UTF-8 text: {e}")], True
    boxes, problems, seen, kinds = [], [], {}, {}
    for no, raw in enumerate(text.splitlines(), 1):
        fields = raw.split()
        if not fields:
            continue
        box, problem = _parse_line(fields, nc)
        if problem:
            problems.append(Problem(problem[0], problem[1], str(path), problem[2], no))
            continue
        key = " ".join(fields)
        if key in seen:
            problems.append(Problem("warning", "duplicate-line", str(path), f"same box as line {seen[key]}; "
                                    "Ultralytics drops the repeat", no))
            continue
        seen[key] = no
        kinds.setdefault(len(fields) == 5, no)
        if len(fields) == 5 and _past_edge(box):
            problems.append(Problem("warning", "edge", str(path), "box extends past the image edge; it is clipped "
                                    "when training", no))
        boxes.append((box[0], box[3], box[4]))
    if len(kinds) == 2:  # Ultralytics reads a whole file as polygons once one line is a polygon
        problems.append(Problem("error", "mixed", str(path), "box line in a file of polygon lines; Ultralytics would "
                                "read it as a 2-point polygon", kinds[True]))
    return boxes, problems, bool(text.split())


def _parse_line(fields: list[str], nc: int):
    """One label line to (cls, cx, cy, w, h), or a (severity, kind, message) problem."""
    n = len(fields)
    if n != 5 and not (n >= 7 and n % 2 == 1):
        return None, ("error", "fields", f"{n} fields; a box line is 'class x_center y_center width height'")
    try:
        values = [float(v) for v in fields]
    except ValueError:
        bad = next(v for v in fields if not _is_number(v))
        return None, ("error", "fields", f"{bad!r} is not a number")
    cls = values[0]
    if not math.isfinite(cls) or cls != int(cls):  # nan, inf and 2.5 are no class id (int() would raise on the first two)
        return None, ("error", "class", f"class id {fields[0]} is not a whole number; class ids are integers "
                                        f"0..{nc - 1}")
    if not 0 <= cls < nc:
        return None, ("error", "class", f"class id {fields[0]} is out of range; the YAML names {nc} classes (0..{nc - 1})")
    coords = values[1:]
    if n == 5:
        cx, cy, w, h = coords
    else:  # a polygon: its bounding box
        xs, ys = coords[0::2], coords[1::2]
        cx, cy, w, h = (max(xs) + min(xs)) / 2, (max(ys) + min(ys)) / 2, max(xs) - min(xs), max(ys) - min(ys)
    if w <= 0 or h <= 0:
        return None, ("error", "empty-box", f"box has zero or negative width or height (w={w:g}, h={h:g})")
    if not all(0.0 <= v <= 1.0 for v in coords):  # also rejects nan
        return None, ("error", "coords", f"coordinates outside 0..1 ({' '.join(fields[1:5])}); labels must be "
                                         "normalized by the image size")
    return (int(cls), cx, cy, w, h), None


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _past_edge(box) -> bool:
    _, cx, cy, w, h = box
    return min(cx - w / 2, cy - h / 2) < -EDGE_TOLERANCE or max(cx + w / 2, cy + h / 2) > 1 + EDGE_TOLERANCE
