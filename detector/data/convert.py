"""Convert COCO JSON or Pascal VOC XML annotations into a YOLO dataset with its data YAML.

Ultralytics' own converters do not fit: `convert_coco` maps COCO's 91 ids to
the 80 COCO classes (wrong for any other category set), always drops crowd
boxes and copies no images; the VOC conversion lives in a download script. So
this module is a small converter with stated rules:

- COCO: class i is the i-th category in ascending category-id order, named by
  its `name`; `bbox` is [x, y, width, height] in pixels. Crowd annotations
  (`iscrowd: 1`) are skipped and counted unless kept.
- VOC: classes are the object names found in the XML files, in alphabetical
  order (for the 20 VOC classes this is the usual order); box corners are
  1-based pixel indices, so a box spans xmin-1..xmax. `difficult` objects are
  skipped and counted unless kept.
- Boxes are clipped to the image; boxes empty after clipping are skipped and
  counted. Images with no boxes get an empty label file (background images).
- Images are copied by default (the dataset is self-contained), or symlinked.

A split is written to OUT/images/SPLIT and OUT/labels/SPLIT; OUT/data.yaml
names every split converted into OUT so far (val falls back to train).
"""

from __future__ import annotations

import json
import os
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import yaml

from detector import fileio, paths
from detector.errors import DatasetError

SPLITS = ("train", "val", "test")


@dataclass
class ConvertResult:
    """What a conversion wrote and what it left out, with counts a user should see."""

    yaml: Path
    split: str
    names: dict
    images: int = 0
    boxes: int = 0
    background_images: int = 0
    skipped_crowd: int = 0
    skipped_difficult: int = 0
    skipped_empty: int = 0
    clipped: int = 0
    unknown_refs: int = 0
    missing_images: list = field(default_factory=list)
    mode: str = "copy"
    category_ids: dict = field(default_factory=dict)  # COCO: class id -> category id

    def lines(self) -> list[str]:
        """The conversion summary as text lines."""
        out = [f"wrote {_n(self.images, 'image')} ({self.mode}) and {_n(self.boxes, 'box')} to split '{self.split}', "
               f"{self.background_images} without boxes; data YAML {self.yaml}"]
        if self.category_ids:
            pairs = ", ".join(f"{self.category_ids[k]}->{k} {self.names[k]}" for k in sorted(self.names))
            out.append(f"classes (COCO category id -> class id, ascending category id): {pairs}")
        else:
            out.append("classes (alphabetical): " + ", ".join(f"{k} {v}" for k, v in sorted(self.names.items())))
        skipped = {("crowd annotation", "(keep with --keep-crowd)"): self.skipped_crowd,
                   ("difficult object", "(keep with --keep-difficult)"): self.skipped_difficult,
                   ("box", "empty after clipping to the image"): self.skipped_empty,
                   ("annotation", "naming an unknown image or category"): self.unknown_refs}
        out += [f"skipped {_n(n, what)} {why}" for (what, why), n in skipped.items() if n]
        if self.clipped:
            out.append(f"clipped {_n(self.clipped, 'box')} to the image bounds")
        if self.missing_images:
            out.append(f"skipped {_n(len(self.missing_images), 'image')} not found under --images "
                       f"(first: {self.missing_images[0]})")
        return out


def _n(count: int, word: str) -> str:
    return f"{count} {word}" if count == 1 else f"{count} {word}es" if word.endswith("x") else f"{count} {word}s"


def from_coco(instances: Path, images_dir: Path, out: Path, split: str = "train", keep_crowd: bool = False,
              link: bool = False) -> ConvertResult:
    """Convert a COCO instances JSON and its image folder into a YOLO split under out."""
    data = _read_coco(Path(instances))
    categories = sorted(data["categories"], key=lambda c: int(c["id"]))
    class_of = {int(c["id"]): i for i, c in enumerate(categories)}
    names = {i: str(c["name"]) for i, c in enumerate(categories)}
    result = ConvertResult(yaml=Path(out) / "data.yaml", split=split, names=names,
                           category_ids={i: int(c["id"]) for i, c in enumerate(categories)})
    images = {int(im["id"]): im for im in data["images"]}
    boxes: dict[int, list] = {i: [] for i in images}
    for ann in data["annotations"]:
        if int(ann.get("image_id", -1)) not in images or int(ann.get("category_id", -1)) not in class_of:
            result.unknown_refs += 1
            continue
        if ann.get("iscrowd", 0) and not keep_crowd:
            result.skipped_crowd += 1
            continue
        x, y, w, h = (float(v) for v in ann["bbox"])
        boxes[int(ann["image_id"])].append((class_of[int(ann["category_id"])], x, y, x + w, y + h))
    records = [(str(im["file_name"]), boxes[i], im.get("width"), im.get("height")) for i, im in sorted(images.items())]
    _write_split(records, Path(images_dir), Path(out), result, link)
    return result


def convert(fmt: str, annotations: Path, images_dir: Path, out: Path, split: str = "train", keep_crowd: bool = False,
            keep_difficult: bool = False, link: bool = False) -> ConvertResult:
    """Convert COCO ('coco') or Pascal VOC ('voc') annotations into a YOLO dataset under out."""
    out = Path(out)
    paths.check_writes([out / "images" / split, out / "labels" / split], [annotations, images_dir], dataset_ok=True)
    if fmt == "coco":
        return from_coco(annotations, images_dir, out, split, keep_crowd=keep_crowd, link=link)
    return from_voc(annotations, images_dir, out, split, keep_difficult=keep_difficult, link=link)


def _read_coco(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DatasetError(f"COCO annotation file {path} not found; pass an instances JSON") from None
    except (OSError, ValueError) as e:
        raise DatasetError(f"{path} is not readable JSON: {e}") from e
    missing = [k for k in ("images", "annotations", "categories") if not isinstance(data.get(k), list)]
    if missing:
        raise DatasetError(f"{path} is not a COCO instances file (no {', '.join(missing)} list)")
    if not data["categories"]:
        raise DatasetError(f"{path} lists no categories; a detection dataset needs at least one")
    return data


def from_voc(annotations: Path, images_dir: Path, out: Path, split: str = "train", keep_difficult: bool = False,
             link: bool = False) -> ConvertResult:
    """Convert a folder of Pascal VOC XML files and its image folder into a YOLO split under out."""
    annotations = Path(annotations)
    if not annotations.is_dir():
        raise DatasetError(f"VOC annotation folder {annotations} not found; pass the folder of .xml files")
    parsed = [_read_voc(p) for p in sorted(annotations.glob("*.xml"))]
    if not parsed:
        raise DatasetError(f"{annotations} holds no .xml files; pass the VOC Annotations folder")
    class_names = sorted({obj[0] for _, _, _, objects in parsed for obj in objects})
    if not class_names:
        raise DatasetError(f"the XML files in {annotations} name no objects; nothing to train on")
    class_of = {n: i for i, n in enumerate(class_names)}
    result = ConvertResult(yaml=Path(out) / "data.yaml", split=split, names=dict(enumerate(class_names)))
    records = []
    for filename, width, height, objects in parsed:
        kept = []
        for name, difficult, x0, y0, x1, y1 in objects:
            if difficult and not keep_difficult:
                result.skipped_difficult += 1
                continue
            kept.append((class_of[name], x0 - 1, y0 - 1, x1, y1))  # 1-based pixel indices -> continuous corners
        records.append((filename, kept, width, height))
    _write_split(records, Path(images_dir), Path(out), result, link)
    return result


def _read_voc(path: Path) -> tuple[str, int | None, int | None, list]:
    """(filename, width, height, [(name, difficult, xmin, ymin, xmax, ymax)]) of one VOC XML file."""
    try:
        root = ET.parse(path).getroot()
        filename = (root.findtext("filename") or "").strip() or path.with_suffix(".jpg").name
        width, height = (int(float(root.findtext(f"size/{k}") or 0)) or None for k in ("width", "height"))
        objects = []
        for obj in root.iter("object"):
            box = obj.find("bndbox")
            corners = [float(box.findtext(k)) for k in ("xmin", "ymin", "xmax", "ymax")]
            objects.append(((obj.findtext("name") or "").strip(), int(float(obj.findtext("difficult") or 0)), *corners))
    except (ET.ParseError, OSError, AttributeError, TypeError, ValueError) as e:
        raise DatasetError(f"{path} is not a readable Pascal VOC annotation ({e}); fix or remove it") from e
    return filename, width, height, objects


def _write_split(records: list, images_dir: Path, out: Path, result: ConvertResult, link: bool) -> None:
    """Place each image and write its label file, then write or update data.yaml."""
    if not images_dir.is_dir():
        raise DatasetError(f"image folder {images_dir} not found; pass --images with the folder of the images")
    img_out, lbl_out = out / "images" / result.split, out / "labels" / result.split
    for folder in (img_out, lbl_out):
        if folder.is_dir() and any(folder.iterdir()):
            raise DatasetError(f"{folder} already holds files; convert into a new --out or another --split")
    existing = _existing_yaml(out / "data.yaml", result.names)
    result.mode = "symlink" if link else "copy"
    for file_name, boxes, width, height in records:
        rel = _safe_relative(file_name)
        src = images_dir / rel if (images_dir / rel).is_file() else images_dir / rel.name
        if not src.is_file():
            result.missing_images.append(file_name)
            continue
        if not width or not height:
            width, height = _image_size(src)
        lines = [line for box in boxes if (line := _yolo_line(box, width, height, result))]
        dst = img_out / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        if link:
            os.symlink(src.resolve(), dst)
        else:
            fileio.copy_file(src, dst)  # a full disk names dst, not the source image
        label = (lbl_out / rel).with_suffix(".txt")
        label.parent.mkdir(parents=True, exist_ok=True)
        fileio.write_text(label, "".join(lines))
        result.images += 1
        result.boxes += len(lines)
        result.background_images += not lines
    if result.images == 0:
        raise DatasetError(f"none of the {len(records)} annotated images was found under {images_dir}; "
                           "pass the folder that holds them with --images")
    _write_yaml(out, result, existing)


def _yolo_line(box, width: float, height: float, result: ConvertResult) -> str | None:
    """'cls cx cy w h' normalized, with the box clipped to the image; None (counted) if empty."""
    cls, x0, y0, x1, y1 = box
    cx0, cy0, cx1, cy1 = max(0.0, x0), max(0.0, y0), min(float(width), x1), min(float(height), y1)
    if (cx0, cy0, cx1, cy1) != (x0, y0, x1, y1):
        result.clipped += 1
    if cx1 - cx0 <= 0 or cy1 - cy0 <= 0:
        result.skipped_empty += 1
        return None
    return (f"{cls} {(cx0 + cx1) / 2 / width:.6f} {(cy0 + cy1) / 2 / height:.6f} "
            f"{(cx1 - cx0) / width:.6f} {(cy1 - cy0) / height:.6f}\n")


def _safe_relative(file_name: str) -> Path:
    """The image's path below the split folder: its own relative path, or just its name if that would escape."""
    p = PurePosixPath(file_name.replace("\\", "/"))
    return Path(p.name) if p.is_absolute() or ".." in p.parts else Path(*p.parts)


def _image_size(path: Path) -> tuple[int, int]:
    from PIL import Image

    try:
        with Image.open(path) as im:
            return im.size
    except Exception as e:  # PIL raises many types for broken files
        raise DatasetError(f"cannot read the size of {path} ({e}) and the annotation does not give it") from e


def _existing_yaml(path: Path, names: dict) -> dict:
    """The data YAML a previous conversion into the same folder wrote; its classes must be these."""
    if not path.is_file():
        return {}
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as e:
        raise DatasetError(f"{path} exists but is not readable YAML ({e}); convert into a new --out") from e
    old = {int(k): str(v) for k, v in (data.get("names") or {}).items()}
    if old and old != names:
        raise DatasetError(f"{path} already names other classes than this conversion; convert into a new --out")
    return data


def _write_yaml(out: Path, result: ConvertResult, existing: dict) -> None:
    splits = {s: existing[s] for s in SPLITS if existing.get(s)}
    splits[result.split] = f"images/{result.split}"
    splits.setdefault("train", splits.get("val") or splits[result.split])
    splits.setdefault("val", splits["train"])  # until a val split is converted
    data = {"path": str(out.resolve()), **{s: splits[s] for s in SPLITS if s in splits},
            "names": {int(k): v for k, v in result.names.items()}}
    header = "# written by 'detector datasets convert'\n"
    if splits["val"] == splits["train"]:
        header += "# val is the train split until a val split is converted into this folder\n"
    fileio.write_text(result.yaml, header + yaml.safe_dump(data, sort_keys=False, allow_unicode=True))
