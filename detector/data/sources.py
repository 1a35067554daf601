"""Image sources for inference: an image file, a folder or a glob, resolved to a sorted list of files.

Used by `detector predict` and by the export parity check. Images are read with
OpenCV (BGR, as Ultralytics expects); an unreadable file is an ImageError, never
a silently skipped image.
"""

from __future__ import annotations

import glob
import os
from pathlib import Path

from detector import paths
from detector.data.datasets import IMAGE_SUFFIXES
from detector.errors import ImageError


# OpenCV's own decode limit (CV_IO_MAX_IMAGE_PIXELS, 2**30): larger images are refused before decoding.
MAX_IMAGE_PIXELS = 1 << 30


def _is_image(p: Path) -> bool:
    return p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES


def _checked(files: list[Path]) -> list[Path]:
    for f in files:  # OpenCV crashes on names that are not UTF-8; say which file instead
        paths.require_utf8(f, ImageError, "image file")
    return files


def resolve(source: str | Path) -> list[Path]:
    """The image files SOURCE names: one image, every image under a folder (recursively), or a glob's matches."""
    text = str(source)
    p = Path(text).expanduser()
    if p.is_dir():
        files = sorted(f for f in p.rglob("*") if _is_image(f))
        if not files:
            raise ImageError(f"folder {paths.shown(p)} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
        return _checked(files)
    if p.is_file():
        if p.suffix.lower() not in IMAGE_SUFFIXES:
            raise ImageError(f"{paths.shown(p)} is not an image file (expected one of "
                             f"{', '.join(sorted(IMAGE_SUFFIXES))})")
        return _checked([p])
    if glob.has_magic(text):
        files = sorted(Path(f) for f in glob.glob(os.path.expanduser(text), recursive=True) if _is_image(Path(f)))
        if not files:
            raise ImageError(f"no images match {paths.shown(text)!r}")
        return _checked(files)
    raise ImageError(f"{paths.shown(p)} does not exist; give an image, a folder of images or a quoted glob such as 'imgs/*.jpg'")


def read(path: Path):
    """The image as a BGR uint8 array; ImageError naming the file if it is too large or cannot be decoded."""
    import cv2
    import numpy as np

    paths.require_utf8(path, ImageError, "image file")
    pixels = _header_pixels(path)
    if pixels and pixels > MAX_IMAGE_PIXELS:
        raise ImageError(f"image {path} has {pixels / 1e6:.0f} megapixels, over the {MAX_IMAGE_PIXELS / 1e6:.0f}-"
                         "megapixel limit of the image decoder; downscale it first")
    try:
        image = cv2.imdecode(np.fromfile(path, dtype=np.uint8), cv2.IMREAD_COLOR)
    except (OSError, cv2.error, ValueError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[-1][:120]
        raise ImageError(f"cannot read image {path}: {first}") from None
    if image is None or image.size == 0:
        raise ImageError(f"cannot read image {path}: not a valid image file (damaged or an unsupported format)")
    return image


def _header_pixels(path: Path) -> int | None:
    """Width x height from the file's header (no decoding), or None when the header cannot tell."""
    from PIL import Image

    limit, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None  # PIL's own bomb limit is lower than OpenCV's
    try:
        with Image.open(path) as im:
            return im.size[0] * im.size[1]
    except Exception:  # not an image PIL knows: OpenCV decides
        return None
    finally:
        Image.MAX_IMAGE_PIXELS = limit


def relative_names(files: list[Path]) -> list[str]:
    """Names that keep files apart: paths relative to the deepest folder they share (just the name for one file)."""
    if len(files) == 1:
        return [files[0].name]
    root = Path(os.path.commonpath([str(f.resolve().parent) for f in files]))
    return [f.resolve().relative_to(root).as_posix() for f in files]
