"""Load a YOLO data YAML the way a user means it, and describe the dataset it names.

A relative `path:` is resolved against the YAML's own folder (Ultralytics would
resolve it against the current directory or its datasets folder). Training uses
a resolved copy with absolute paths and no `download:` key, so nothing can
trigger a download and the run folder records exactly what was trained on.
"""

from __future__ import annotations

import glob
import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from detector import fileio
from detector import paths
from detector.errors import DatasetError

IMAGE_SUFFIXES = {".bmp", ".dng", ".jpeg", ".jpg", ".mpo", ".png", ".tif", ".tiff", ".webp", ".pfm", ".heic"}


@dataclass(frozen=True)
class DatasetInfo:
    """A resolved dataset: where it is, what it holds, and a fingerprint of its files."""

    yaml: Path  # the user's YAML
    root: Path
    splits: dict  # split name -> list of absolute image paths (as str)
    names: dict  # class id -> name
    fingerprint: str
    raw: dict = field(repr=False, default_factory=dict)
    check: dict | None = field(repr=False, default=None)  # key figures of dataset_check, once it has run

    @property
    def train_images(self) -> int:
        return len(self.splits["train"])

    @property
    def val_images(self) -> int:
        return len(self.splits["val"])

    def summary(self) -> dict:
        """The run.json `dataset` entry."""
        return {
            "yaml": str(self.yaml),
            "root": str(self.root),
            "train_images": self.train_images,
            "val_images": self.val_images,
            "names": {int(k): v for k, v in self.names.items()},
            "fingerprint": self.fingerprint,
            **({"check": self.check} if self.check is not None else {}),
        }

    def resolved_yaml(self) -> dict:
        """The data YAML with absolute paths and without `download`, as handed to Ultralytics."""
        data = {k: v for k, v in self.raw.items() if k not in {"download", "path"}}
        data["path"] = str(self.root)
        for split in ("train", "val", "test"):
            if split in data and data[split]:
                data[split] = _absolute(self.root, data[split])
        data["names"] = {int(k): v for k, v in self.names.items()}
        return data

    def write_resolved(self, path: Path) -> Path:
        """Write resolved_yaml() to path and return it.

        A split given as a .txt list is rewritten beside it as a list of absolute
        paths: Ultralytics reads relative lines against the current directory
        (only './' lines against the list's folder), while users mean the list's folder.
        """
        data = self.resolved_yaml()
        for split in ("train", "val"):
            entries = self.raw[split] if isinstance(self.raw[split], list) else [self.raw[split]]
            if any(str(e).endswith(".txt") for e in entries):
                listed = path.with_name(f"{path.stem}-{split}.txt")
                fileio.write_text(listed, "".join(f"{image}\n" for image in self.splits[split]))
                data[split] = str(listed)
        fileio.write_text(path, yaml.safe_dump(data, sort_keys=False))
        return path


def _absolute(root: Path, entry):
    if isinstance(entry, list):
        return [str((root / e).resolve()) for e in entry]
    return str((root / entry).resolve())


def _images_in(root: Path, entry, split: str, yaml_path: Path) -> list[str]:
    """Image files named by one split entry: a folder, a .txt list of files, or a list of those."""
    entries = entry if isinstance(entry, list) else [entry]
    found: list[str] = []
    for e in entries:
        p = (root / str(e)).resolve()
        if p.is_dir():
            found += _images_under(p, split, yaml_path)
        elif p.is_file() and p.suffix == ".txt":
            for line in p.read_text(encoding="utf-8").splitlines():
                line = line.strip()
                if line:
                    q = Path(line) if Path(line).is_absolute() else (p.parent / line)
                    found.append(str(q.resolve()))
        elif p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES:
            found.append(str(p))
        else:
            raise DatasetError(f"{yaml_path}: the {split} path {p} does not exist; fix '{split}:' or 'path:' in the YAML")
    if not found:
        raise DatasetError(f"{yaml_path}: the {split} split has no images under {p}; add images or fix '{split}:'")
    return found


def _images_under(folder: Path, split: str, yaml_path: Path) -> list[str]:
    """The images Ultralytics reads from a folder: its recursive glob, which follows symlinks.

    A symlink loop (a link to the folder itself or above it) would make that glob read
    the same images again and again, dozens of copies; a folder reached twice is
    read twice. Both are refused, naming the link.
    """
    seen: dict[str, str] = {}
    for top, _, _ in os.walk(folder, followlinks=True):
        real = os.path.realpath(top)
        if real in seen:  # stop at the first repeat, or the walk itself would go round the loop
            raise DatasetError(f"{yaml_path}: the {split} folder reaches {real} twice ({seen[real]} and {top}, "
                               "through a symlink); Ultralytics would read its images more than once: remove the link")
        seen[real] = top
    files = glob.glob(str(folder / "**" / "*.*"), recursive=True)  # as Ultralytics' dataset lists them
    return sorted(f for f in files if Path(f).suffix.lower() in IMAGE_SUFFIXES and os.path.isfile(f))


def _names(raw: dict, yaml_path: Path) -> dict:
    """Class id -> name, refused unless the ids are exactly 0..N-1 and nc (if given) is N."""
    names = raw.get("names")
    if isinstance(names, list):
        names = dict(enumerate(names))
    if not isinstance(names, dict) or not names:
        raise DatasetError(f"{yaml_path}: 'names:' is missing or empty; list the class names")
    bad = [k for k in names if isinstance(k, bool) or not isinstance(k, int) and not str(k).strip().isdigit()]
    if bad:
        raise DatasetError(f"{yaml_path}: 'names:' has the key {bad[0]!r}; keys are class ids 0, 1, 2, ... "
                           "(or give names as a list)")
    names = {int(k): str(v) for k, v in names.items()}
    missing = sorted(set(range(max(names) + 1)) - set(names))
    if missing or min(names) < 0:
        gaps = ", ".join(map(str, missing[:10])) + (", ..." if len(missing) > 10 else "")
        raise DatasetError(f"{yaml_path}: 'names:' skips class id{'s' if len(missing) > 1 else ''} {gaps}; class ids "
                           f"must run 0..N-1 without gaps: name every id or renumber the labels")
    nc = raw.get("nc")
    if nc is not None and (isinstance(nc, bool) or not isinstance(nc, int)):
        raise DatasetError(f"{yaml_path}: nc is {nc!r}, not a whole number; set nc: {len(names)} or remove it")
    if nc is not None and nc != len(names):
        raise DatasetError(f"{yaml_path}: nc is {nc} but 'names:' lists {len(names)} classes; make them agree")
    return names


def _fingerprint(splits: dict) -> str:
    """A hash of every image and label file's name and size: cheap, and changes when the data does."""
    h = hashlib.sha1()
    for split in sorted(splits):
        for img in splits[split]:
            p = Path(img)
            label = label_path(p)
            h.update(f"{split}|{p.name}|{_size(p)}|{_size(label)}\n".encode())
    return h.hexdigest()[:16]


def _size(p: Path) -> int:
    try:
        return p.stat().st_size
    except OSError:
        return -1


def label_path(image: Path) -> Path:
    """The YOLO label file of an image: the last 'images' folder in its path becomes 'labels'."""
    parts = list(Path(image).parts)
    for i in range(len(parts) - 1, -1, -1):
        if parts[i] == "images":
            parts[i] = "labels"
            break
    return Path(*parts).with_suffix(".txt")


def load(yaml_path: str | Path) -> DatasetInfo:
    """Read and check a data YAML; raise DatasetError with one clear sentence when it cannot train."""
    yaml_path = Path(yaml_path).expanduser()
    paths.require_utf8(yaml_path, DatasetError, "data file")
    if yaml_path.is_dir():
        inside = sorted(yaml_path.glob("*.yaml")) + sorted(yaml_path.glob("*.yml"))
        hint = f" such as {inside[0]}" if inside else ""
        raise DatasetError(f"{yaml_path} is a folder; pass its data YAML{hint} instead")
    if not yaml_path.is_file():
        raise DatasetError(f"data file {yaml_path} not found; pass --data with a YOLO data YAML")
    try:
        raw = yaml.safe_load(yaml_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise DatasetError(f"{yaml_path} is not readable YAML: {str(e).splitlines()[0][:200]}") from e
    if not isinstance(raw, dict):
        raise DatasetError(f"{yaml_path} is not a YOLO data YAML (expected keys path, train, val, names)")
    missing = [k for k in ("train", "val") if not raw.get(k)]
    if missing:
        raise DatasetError(f"{yaml_path} has no {' or '.join(missing)} key; a data YAML needs both train: and val:")
    base = yaml_path.resolve().parent
    root = Path(str(raw.get("path") or "."))
    root = (root if root.is_absolute() else base / root).resolve()
    if not root.is_dir():
        raise DatasetError(f"{yaml_path}: dataset folder {root} (from 'path:') does not exist")
    names = _names(raw, yaml_path)
    splits = {s: _images_in(root, raw[s], s, yaml_path) for s in ("train", "val")}
    for image in (i for files in splits.values() for i in files):  # before anything hashes or decodes a name
        paths.require_utf8(image, DatasetError, "image file")
    return DatasetInfo(
        yaml=yaml_path.resolve(), root=root, splits=splits, names=names, fingerprint=_fingerprint(splits), raw=raw
    )


def image_aspects(images) -> tuple[float, ...]:
    """Height / width of each image, from its header, turned as its EXIF orientation says (as Ultralytics reads it).

    An image whose header cannot be read is left out: the training's own scan reports it.
    """
    from PIL import Image

    out = []
    for image in images:
        try:
            with Image.open(image) as im:
                w, h = im.size
                if im.format == "JPEG" and im.getexif().get(0x0112) in (6, 8):  # stored turned by 90 degrees
                    w, h = h, w
        except Exception:  # noqa: BLE001  PIL raises many types for broken files
            continue
        if w > 0 and h > 0:
            out.append(h / w)
    return tuple(out)
