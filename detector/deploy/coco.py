"""COCO ids for predictions, and COCO's 12 metrics (detector predict --coco-gt, detector val --coco-gt).

A model knows its classes by index and name, and `detector predict` its images by
file name. A COCO annotation file knows both by its own ids. The ids are taken
from the annotation file: images matched by file name, categories by name (case
and surrounding spaces ignored). The usual COCO 80 -> 91 mapping falls out of
that: 'person' is category 1 whatever its index in the model. Scoring uses
pycocotools (the `detector[coco]` extra), imported only when scoring.
"""

from __future__ import annotations

import contextlib
import io
import json
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from detector.errors import DatasetError, UsageError

INSTALL_HINT = "pip install 'detector[coco]'"
# pycocotools' COCOeval.stats, in order.
METRICS = (
    ("AP", "AP @[IoU=0.50:0.95 | area=all | maxDets=100]"),
    ("AP50", "AP @[IoU=0.50 | area=all | maxDets=100]"),
    ("AP75", "AP @[IoU=0.75 | area=all | maxDets=100]"),
    ("APs", "AP @[IoU=0.50:0.95 | area=small | maxDets=100]"),
    ("APm", "AP @[IoU=0.50:0.95 | area=medium | maxDets=100]"),
    ("APl", "AP @[IoU=0.50:0.95 | area=large | maxDets=100]"),
    ("AR1", "AR @[IoU=0.50:0.95 | area=all | maxDets=1]"),
    ("AR10", "AR @[IoU=0.50:0.95 | area=all | maxDets=10]"),
    ("AR100", "AR @[IoU=0.50:0.95 | area=all | maxDets=100]"),
    ("ARs", "AR @[IoU=0.50:0.95 | area=small | maxDets=100]"),
    ("ARm", "AR @[IoU=0.50:0.95 | area=medium | maxDets=100]"),
    ("ARl", "AR @[IoU=0.50:0.95 | area=large | maxDets=100]"),
)


def _key(name: str) -> str:
    return str(name).strip().lower()


@dataclass(frozen=True)
class CocoIds:
    """The ids of one COCO annotation file: image ids by file name, category ids by name."""

    path: Path
    images: dict  # file name as written in the file (posix) -> image id
    categories: dict  # lower-cased category name -> category id

    def image_id(self, file_name: str) -> int | None:
        """The id of an image, by its path relative to the annotations' image folder, else by its base name."""
        posix = PurePosixPath(str(file_name).replace("\\", "/"))
        found = self.images.get(str(posix))
        if found is None:
            found = self._by_base().get(posix.name)
        return found

    def _by_base(self) -> dict:
        bases: dict = {}
        for name, image_id in self.images.items():
            bases.setdefault(PurePosixPath(name).name, image_id)
        return bases

    def category_map(self, names: dict) -> dict[int, int]:
        """Model class index -> category id, for the classes whose name the annotation file has."""
        return {int(i): self.categories[_key(n)] for i, n in names.items() if _key(n) in self.categories}


def load(path: str | Path) -> CocoIds:
    """Read the ids of a COCO instances JSON; DatasetError (one line) when it is not one."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise DatasetError(f"COCO annotation file {path} not found; pass an instances JSON (e.g. instances_val2017.json)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        images = {str(PurePosixPath(str(im["file_name"]).replace("\\", "/"))): int(im["id"]) for im in data["images"]}
        categories = {_key(c["name"]): int(c["id"]) for c in data["categories"]}
    except (OSError, ValueError) as e:
        raise DatasetError(f"{path} cannot be read as JSON ({e}); pass a COCO instances file") from None
    except (KeyError, TypeError):
        raise DatasetError(f"{path} is not a COCO instances file: it needs 'images' (id, file_name) "
                           "and 'categories' (id, name)") from None
    if not images or not categories:
        raise DatasetError(f"{path} lists no {'images' if not images else 'categories'}; pass a COCO instances file")
    return CocoIds(path=path, images=images, categories=categories)


def match_images(ids: CocoIds, names: list[str]) -> list[int]:
    """The image id of every file name; DatasetError naming the first one the annotation file lacks."""
    out = []
    for name in names:
        image_id = ids.image_id(name)
        if image_id is None:
            raise DatasetError(f"image {name} is not in {ids.path} (images are matched by file name); "
                               "predict only images the annotation file lists")
        out.append(image_id)
    return out


def match_classes(ids: CocoIds, names: dict) -> dict[int, int]:
    """The category map for a model's class names; DatasetError when no class name is a category."""
    mapping = ids.category_map(names)
    if not mapping:
        shown = ", ".join(list(map(str, names.values()))[:3])
        raise DatasetError(f"none of the model's class names ({shown}, ...) is a category name in {ids.path}; "
                           "categories are matched by name")
    return mapping


def to_coco(rows: list[dict], image_ids: dict, category_ids: dict) -> list[dict]:
    """Prediction rows with COCO's image and category ids; boxes of classes the file lacks are left out."""
    out = []
    for r in rows:
        if r["category_id"] in category_ids:
            out.append({**r, "image_id": image_ids[r["file_name"]], "category_id": category_ids[r["category_id"]]})
    return out


@dataclass
class Remap:
    """What `detector predict --coco-gt` needs: images matched first, classes once the model is loaded."""

    ids: CocoIds
    image_ids: dict  # file name as predict names it -> COCO image id
    category_ids: dict | None = None  # model class index -> COCO category id

    @classmethod
    def for_images(cls, gt_path: Path, names: list[str]) -> "Remap":
        """Read the annotation file and match every image (before anything is predicted or written)."""
        ids = load(gt_path)
        return cls(ids, dict(zip(names, match_images(ids, names))))

    def with_classes(self, model_names: dict) -> "Remap":
        self.category_ids = match_classes(self.ids, model_names)
        return self

    def apply(self, rows: list[dict]) -> list[dict]:
        return to_coco(rows, self.image_ids, self.category_ids or {})


def _pycocotools():
    try:
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval
    except ImportError:
        raise UsageError(f"COCO metrics need pycocotools, which is not installed; {INSTALL_HINT}") from None
    return COCO, COCOeval


def require() -> None:
    """Refuse --coco-gt scoring up front when pycocotools is missing."""
    _pycocotools()


def evaluate(gt_path: Path, detections: list[dict], image_ids: list[int] | None = None) -> dict:
    """COCO's 12 box metrics of detections (COCO results, ids from gt_path), on image_ids (default: all)."""
    COCO, COCOeval = _pycocotools()
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress and its table
        gt = COCO(str(gt_path))
        if not detections:
            return {name: 0.0 for name, _ in METRICS}
        dt = gt.loadRes([{k: d[k] for k in ("image_id", "category_id", "bbox", "score")} for d in detections])
        ev = COCOeval(gt, dt, "bbox")
        if image_ids is not None:
            ev.params.imgIds = sorted(set(image_ids))
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    # COCOeval reports -1 where a metric has nothing to measure (no small objects, say).
    return {name: float(v) for (name, _), v in zip(METRICS, ev.stats)}
