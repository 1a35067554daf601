"""Albumentations pipelines: load a user's file or a shipped preset, validate it, record it.

A pipeline is what `A.save` writes (YAML or JSON): usually a Compose whose
`transforms` run on every training image after Ultralytics' mosaic and
perspective stage, inside Ultralytics' own Albumentations step (which replaces
its default Blur/MedianBlur/ToGray/CLAHE set). Compose-level settings such as
`bbox_params` are not used: Ultralytics composes the list itself with YOLO boxes.

Validation runs before training and names the one transform at fault: unknown
class, bad parameter, `Lambda`, a spatial transform that cannot move boxes, or
a transform that changes the image size (a batch needs one size).
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from functools import cached_property
from importlib import resources
from pathlib import Path

import yaml

from detector import runtime
from detector.errors import AugmentError

PRESETS = ("none", "ultralytics", "light", "heavy")
DEFAULT_PRESET = "ultralytics"  # what Ultralytics applies when it is given no list

# Classes whose output size is random by design, whatever their parameters.
_RANDOM_SIZE = frozenset({"RandomScale"})
# Spatial transforms that resize or crop to a size of their own: named in the size error's hint.
_SIZED = frozenset({
    "Resize", "RandomCrop", "CenterCrop", "Crop", "RandomResizedCrop", "RandomSizedCrop", "RandomSizedBBoxSafeCrop",
    "BBoxSafeRandomCrop", "RandomCropNearBBox", "RandomCropFromBorders", "AtLeastOneBBoxRandomCrop",
    "CropNonEmptyMaskIfExists", "LongestMaxSize", "SmallestMaxSize", "PadIfNeeded", "Pad", "CropAndPad",
})
_SIZE_TRIES = 3  # a random-size transform must keep the size on every one of these tries


def _albumentations():
    """Import albumentations after the hermetic environment is set (no update check)."""
    runtime.prepare()
    import albumentations as A

    return A


@dataclass(frozen=True)
class Pipeline:
    """A validated list of transforms in A.to_dict form, and where it came from."""

    source: str  # a preset name, or the file's absolute path
    transforms: tuple  # each item: A.to_dict(transform), as Ultralytics stores them in checkpoints

    @cached_property
    def objects(self) -> list:
        """The transforms as Albumentations objects."""
        A = _albumentations()
        with warnings.catch_warnings():  # checked when the pipeline was resolved; see _refuse_unknown_arguments
            warnings.simplefilter("ignore", UserWarning)
            return [A.from_dict(t) for t in self.transforms]

    def record(self) -> dict:
        """The run.json `augmentations` entry: what A.save would write for this pipeline (A.load reads it)."""
        A = _albumentations()
        return A.to_dict(A.Compose(self.objects))

    def describe(self) -> str:
        """One line for the console: source and transform names with their probabilities."""
        names = [f"{t['transform']['__class_fullname__']}(p={t['transform'].get('p')})" for t in self.transforms]
        return f"{self.source}: {', '.join(names) or 'no Albumentations transforms'}"


def preset_path(name: str) -> Path:
    """The data file of a shipped preset."""
    return Path(str(resources.files("detector.augment") / "presets" / f"{name}.yaml"))


def resolve(spec: str | Path | None, imgsz: int) -> Pipeline:
    """Load a preset name or A.save file (None: Ultralytics' default) and validate it for imgsz x imgsz images."""
    source, tree = _read(spec)
    nodes = _top_level(tree, source)
    objects = [_build(node, source) for node in nodes]
    for node in nodes:
        _check_tree(node, source, imgsz)
    A = _albumentations()
    pipeline = Pipeline(source=source, transforms=tuple(A.to_dict(t) for t in objects))
    from detector.yolo import loader# the last word: Ultralytics' own Albumentations step on a dummy sample

    loader.check_augmentations(list(pipeline.transforms), imgsz, source)
    return pipeline


def from_record(record: dict, source: str = "run.json") -> Pipeline:
    """A Pipeline back from a run.json `augmentations` entry."""
    nodes = _top_level(record, source)
    A = _albumentations()
    return Pipeline(source=source, transforms=tuple(A.to_dict(_build(n, source)) for n in nodes))


# -- reading --------------------------------------------------------------------------------------------------------

def _read(spec) -> tuple[str, dict]:
    """(source, serialized dict) for a preset name or a file."""
    spec = DEFAULT_PRESET if spec is None else str(spec)
    if spec in PRESETS:
        return spec, _parse(preset_path(spec), spec)
    path = Path(spec).expanduser()
    if not path.is_file():
        raise AugmentError(f"--augment {spec}: no such file and not a preset; use a file written by A.save "
                           f"(YAML or JSON) or one of {', '.join(PRESETS)}")
    return str(path.resolve()), _parse(path, spec)


def _parse(path: Path, shown: str) -> dict:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise AugmentError(f"{shown} is not a text file: an A.save pipeline is YAML or JSON") from None
    try:
        data = json.loads(text) if path.suffix.lower() == ".json" else yaml.safe_load(text)
    except (ValueError, yaml.YAMLError) as e:
        kind = "JSON" if path.suffix.lower() == ".json" else "YAML"
        raise AugmentError(f"{shown} is not valid {kind}: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict) or not isinstance(data.get("transform"), dict):
        raise AugmentError(f"{shown} is not an Albumentations pipeline: expected a 'transform:' key as A.save writes")
    return data


def _top_level(data: dict, source: str) -> list[dict]:
    """The transforms Ultralytics should run: a Compose's children, or the single transform saved."""
    root = data["transform"] if "transform" in data else data
    name = root.get("__class_fullname__") if isinstance(root, dict) else None
    if not name:
        raise AugmentError(f"{source}: the pipeline's transform has no '__class_fullname__'; save it with A.save")
    if name.rsplit(".", 1)[-1] == "Compose":
        children = root.get("transforms") or []
        if not isinstance(children, list):
            raise AugmentError(f"{source}: Compose 'transforms' must be a list")
        return children
    return [root]


# -- building and checking ------------------------------------------------------------------------------------------

def _name(node) -> str:
    if not isinstance(node, dict) or not node.get("__class_fullname__"):
        raise AugmentError(f"a transform entry has no '__class_fullname__': {str(node)[:80]}")
    return str(node["__class_fullname__"]).rsplit(".", 1)[-1]


def _class(node: dict, source: str):
    _albumentations()  # first: importing any albumentations module runs its update check unless offline is set
    from albumentations.core.serialization import SERIALIZABLE_REGISTRY, register_additional_transforms

    register_additional_transforms()
    name = _name(node)
    if name == "Lambda":
        raise AugmentError(f"{source}: Lambda cannot be serialized into the run or its checkpoints; "
                           "write a subclass of A.ImageOnlyTransform or A.DualTransform in an importable module")
    cls = SERIALIZABLE_REGISTRY.get(name)
    if cls is None:
        raise AugmentError(f"{source}: unknown transform {name!r}: Albumentations has no such class "
                           "(check the spelling and the albumentations version)")
    return cls


def _build(node: dict, source: str, p: float | None = None):
    """One transform (and its children) from its serialized dict; p overrides its probability."""
    cls = _class(node, source)
    name = _name(node)
    args = {k: v for k, v in node.items() if k != "__class_fullname__"}
    if "transforms" in args:
        args["transforms"] = [_build(child, source) for child in args["transforms"] or []]
    if p is not None:
        args["p"] = p
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            transform = cls(**args)
    except Exception as e:  # pydantic ValidationError (a ValueError), TypeError for unexpected arguments
        raise AugmentError(f"{source}: bad parameter for {name}: {_first_problem(e)}") from None
    _refuse_unknown_arguments(caught, transform, name, source)
    return transform


def _refuse_unknown_arguments(caught: list, transform, name: str, source: str) -> None:
    """Albumentations only warns about arguments a transform does not take; refuse them.

    Arguments that the transform's own A.to_dict writes back are not the user's mistake:
    some classes (SafeRotate, a subclass of Affine) serialize their parent's fields and then
    warn when A.load reads them.
    """
    import re

    A = _albumentations()
    own = set(A.to_dict(transform)["transform"])
    for w in caught:
        found = re.search(r"Argument\(s\) '([^']*)' are not valid for transform", str(w.message))
        if found:
            unknown = [a.strip() for a in found.group(1).split(",") if a.strip() not in own]
            if unknown:
                raise AugmentError(f"{source}: bad parameter for {name}: it takes no argument "
                                   f"{', '.join(repr(a) for a in unknown)}")


def _first_problem(e: Exception) -> str:
    errors = getattr(e, "errors", None) or getattr(e.__cause__, "errors", None)  # Albumentations re-raises pydantic's
    if callable(errors):
        try:
            first = errors()[0]
            loc = ".".join(str(x) for x in first.get("loc", ()))
            return f"{loc}: {first.get('msg')}" if loc else str(first.get("msg"))
        except Exception:
            pass
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def _check_tree(node: dict, source: str, imgsz: int) -> None:
    """Check a transform and, for OneOf/SomeOf/Sequential, each child on its own."""
    A = _albumentations()
    cls = _class(node, source)
    if issubclass(cls, A.BaseCompose):
        for child in node.get("transforms") or []:
            _check_tree(child, source, imgsz)
        return
    _check_leaf(node, cls, source, imgsz)


def _check_leaf(node: dict, cls, source: str, imgsz: int) -> None:
    A = _albumentations()  # first, as in _class
    from albumentations.core.type_definitions import Targets

    name = _name(node)
    targets = getattr(cls, "_targets", ())
    targets = targets if isinstance(targets, tuple) else (targets,)
    if not issubclass(cls, (A.ImageOnlyTransform, A.DualTransform)):
        raise AugmentError(f"{source}: {name} is not a 2D image transform the training loader can run "
                           "(Ultralytics makes its own tensors); remove it")
    if issubclass(cls, A.DualTransform) and Targets.BBOXES not in targets:
        raise AugmentError(f"{source}: {name} moves pixels but cannot move bounding boxes, so labels would no "
                           "longer match the image; use a bbox-aware transform instead")
    if name in _RANDOM_SIZE:
        raise _size_error(source, name, imgsz, "a random size")
    transform = _build(node, source, p=1.0)  # force it to run, so a rare transform is checked too
    _dry_run(transform, name, source, imgsz)


def _dry_run(transform, name: str, source: str, imgsz: int) -> None:
    """Run one transform on a dummy imgsz x imgsz image with one box; it must keep the size and not fail."""
    import numpy as np

    A = _albumentations()
    boxes = isinstance(transform, A.DualTransform)  # image-only transforms get no box processor (no warning)
    compose = A.Compose([transform], seed=0, **({"bbox_params": A.BboxParams(
        format="yolo", label_fields=["class_labels"])} if boxes else {}))
    image = np.random.default_rng(0).integers(0, 256, (imgsz, imgsz, 3), dtype=np.uint8)
    targets = {"bboxes": np.array([[0.5, 0.5, 0.4, 0.3]]), "class_labels": [0]} if boxes else {}
    for _ in range(_SIZE_TRIES):
        try:
            with warnings.catch_warnings():  # advice meant for other uses (e.g. "no mask given") is noise here
                warnings.simplefilter("ignore", UserWarning)
                out = compose(image=image, **targets)
        except Exception as e:
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise AugmentError(f"{source}: {name} fails on a training image: {type(e).__name__}: {first}") from None
        shape = out["image"].shape
        if shape[:2] != (imgsz, imgsz):
            raise _size_error(source, name, imgsz, f"{shape[1]}x{shape[0]}")
        if shape[2:] != (3,):
            raise AugmentError(f"{source}: {name} changes the image to {shape[2:] or 1} channels; keep 3 channels")
        if out["image"].dtype != np.uint8:
            raise AugmentError(f"{source}: {name} turns the uint8 image into {out['image'].dtype}; training images "
                               "must stay uint8 (Ultralytics scales them to 0..1 itself), so remove it")


def _size_error(source: str, name: str, imgsz: int, got: str) -> AugmentError:
    zoom = "Ultralytics' scale/translate already zoom and crop"
    hint = (f"give it an output of {imgsz}x{imgsz} or remove it ({zoom})" if name in _SIZED
            else f"remove it ({zoom})" if name in _RANDOM_SIZE else "remove it")
    return AugmentError(f"{source}: {name} changes the image size from {imgsz}x{imgsz} to {got}, but every image "
                        f"of a batch must stay {imgsz}x{imgsz}; {hint}")
