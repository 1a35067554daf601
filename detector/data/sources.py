"""Image sources for inference: an image file, a folder or a glob, resolved to a sorted list of files.

Used by `detector predict` and by the export parity check. Images are read with
OpenCV (BGR, as Ultralytics expects); an unreadable file is an ImageError, never
a silently skipped image.
"""

from __future__ import annotations

import glob
import os
from pathlib import Path

from detector.data.datasets import IMAGE_SUFFIXES
from detector.errors import ImageError


def _is_image(p: Path) -> bool:
    return p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES


def resolve(source: str | Path) -> list[Path]:
    """The image files SOURCE names: one image, every image under a folder (recursively), or a glob's matches."""
    text = str(source)
    p = Path(text).expanduser()
    if p.is_dir():
        files = sorted(f for f in p.rglob("*") if _is_image(f))
        if not files:
            raise ImageError(f"folder {p} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
        return files
    if p.is_file():
        if p.suffix.lower() not in IMAGE_SUFFIXES:
            raise ImageError(f"{p} is not an image file (expected one of {', '.join(sorted(IMAGE_SUFFIXES))})")
        return [p]
    if glob.has_magic(text):
        files = sorted(Path(f) for f in glob.glob(os.path.expanduser(text), recursive=True) if _is_image(Path(f)))
        if not files:
            raise ImageError(f"no images match {text!r}")
        return files
    raise ImageError(f"{p} does not exist; give an image, a folder of images or a quoted glob such as 'imgs/*.jpg'")


def read(path: Path):
    """The image as a BGR uint8 array; ImageError if OpenCV cannot decode it."""
    import cv2

    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if image is None or image.size == 0:
        raise ImageError(f"cannot read image {path}: not a valid image file (damaged or an unsupported format)")
    return image


def relative_names(files: list[Path]) -> list[str]:
    """Names that keep files apart: paths relative to the deepest folder they share (just the name for one file)."""
    if len(files) == 1:
        return [files[0].name]
    root = Path(os.path.commonpath([str(f.resolve().parent) for f in files]))
    return [f.resolve().relative_to(root).as_posix() for f in files]
