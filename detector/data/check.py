"""Check a YOLO dataset before training on it: a summary of what it holds and every problem, by file and line.

Errors are what breaks training or silently damages it: Ultralytics drops an
image with any malformed label line (wrong field count, class id out of range,
coordinates outside 0..1), an unreadable or truncated image, or trains on
nothing when a split has no labels at all. Warnings are worth knowing but train
as the user meant (duplicates, labels without images, boxes past the edge).

Speed matters because `detector train` runs the check first: each image file is
read once (content hash, structure check, JPEG end marker, a reduced-size decode
that still reads every byte) in a thread pool, and label files are parsed with
plain string splitting. The result is cached by the dataset's fingerprint.
"""

from __future__ import annotations

import logging
import hashlib
import json
import os
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

from detector import fileio, runtime
from detector.data import datasets
from detector.data.inspect_files import Problem, inspect_image, parse_label
from detector.errors import DatasetError

log = logging.getLogger(__name__)

CHECK_VERSION = 1  # bump when the checks change, so cached results are recomputed


@dataclass
class CheckResult:
    """What `check` found: the summary figures and the problems, errors first."""

    yaml: str
    root: str
    summary: dict
    problems: list[Problem] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def errors(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == "error"]

    @property
    def warnings(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == "warning"]

    @property
    def ok(self) -> bool:
        return not self.errors

    def to_json(self) -> dict:
        return {"yaml": self.yaml, "root": self.root, "ok": self.ok, "errors": len(self.errors),
                "warnings": len(self.warnings), "seconds": round(self.seconds, 3), "summary": self.summary,
                "problems": [asdict(p) for p in self.problems]}

    @classmethod
    def from_json(cls, data: dict) -> CheckResult:
        return cls(yaml=data["yaml"], root=data["root"], summary=data["summary"],
                   problems=[Problem(**p) for p in data["problems"]], seconds=data["seconds"])

    def figures(self) -> dict:
        """The key figures a run records in its dataset entry (the densest image sizes batch memory)."""
        train = self.summary["splits"]["train"]
        return {"errors": len(self.errors), "warnings": len(self.warnings), "train_boxes": train["boxes"],
                "train_background_images": train["background"], "max_boxes_per_image": self.summary["max_boxes"],
                "densest_image": self.summary["densest_image"]}



def check(info: datasets.DatasetInfo) -> CheckResult:
    """Check every image and label file of the dataset's splits; never raises for bad data, it reports it."""
    started = time.perf_counter()
    nc = len(info.names)
    unique = sorted({p for paths in info.splits.values() for p in paths})
    workers = min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=workers) as pool:  # PIL and file reads release the GIL
        images = {im.path: im for im in pool.map(inspect_image, unique, chunksize=16)}
    labels = {p: parse_label(datasets.label_path(Path(p)), nc) for p in unique}
    problems = [im.problem for im in images.values() if im.problem]
    problems += [pr for p in unique for pr in labels[p][1]]
    splits = {s: _split_summary(paths, images, labels, info.names) for s, paths in info.splits.items()}
    problems += _split_problems(info, splits)
    problems += _duplicates(info, images)
    problems += _orphan_labels(info)
    densest = max(splits.values(), key=lambda s: s["boxes_per_image"]["max"])
    summary = {
        "classes": nc,
        "names": {int(k): v for k, v in info.names.items()},
        "splits": splits,
        "shared_images": len(set(info.splits["train"]) & set(info.splits["val"])),
        "max_boxes": densest["boxes_per_image"]["max"],
        "densest_image": densest["boxes_per_image"]["densest"],
        "box_sizes": _box_sizes(info.splits["train"], images, labels),
    }
    order = {"error": 0, "warning": 1}
    problems.sort(key=lambda p: (order[p.severity], p.file, p.line or 0, p.kind))
    return CheckResult(yaml=str(info.yaml), root=str(info.root), summary=summary, problems=problems,
                       seconds=time.perf_counter() - started)


def _split_summary(paths: list[str], images: dict, labels: dict, names: dict) -> dict:
    """Counts of one split: images, labels, background images, instances per class, boxes per image."""
    no_file = sum(1 for p in paths if labels[p][0] is None)
    empty = sum(1 for p in paths if labels[p][0] == [] and not labels[p][2])
    invalid = sum(1 for p in paths if labels[p][0] == [] and labels[p][2])  # every line is an error
    per_class = Counter(cls for p in paths for cls, _, _ in labels[p][0] or [])
    counts = sorted((len(labels[p][0] or []), p) for p in paths)
    n = len(counts)
    return {
        "images": n,
        "labelled": n - no_file - empty - invalid,
        "background": no_file + empty,
        "no_label_file": no_file,
        "empty_label_file": empty,
        "no_valid_line": invalid,
        "unreadable_images": sum(1 for p in paths if images[p].problem and images[p].problem.severity == "error"),
        "boxes": sum(c for c, _ in counts),
        "instances": {names[k]: per_class[k] for k in sorted(names) if per_class[k]},
        "classes_without_instances": [names[k] for k in sorted(names) if not per_class[k]],
        "boxes_per_image": {
            "mean": round(sum(c for c, _ in counts) / n, 2) if n else 0,
            "median": counts[n // 2][0] if n else 0,
            "max": counts[-1][0] if n else 0,
            "densest": counts[-1][1] if n else None,
        },
    }


def _box_sizes(paths: list[str], images: dict, labels: dict) -> dict:
    """Box size distribution of the train split: quantiles of sqrt(w*h) (normalized) and COCO size classes in px."""
    sides, small, medium, large = [], 0, 0, 0
    for p in dict.fromkeys(paths):
        size = images[p].size
        for _, w, h in labels[p][0] or []:
            sides.append((w * h) ** 0.5)
            if size:
                area = w * size[0] * h * size[1]
                small, medium, large = small + (area < 32**2), medium + (32**2 <= area < 96**2), large + (area >= 96**2)
    sides.sort()
    quantiles = {f"p{q}": round(sides[min(len(sides) - 1, int(q / 100 * len(sides)))], 4) for q in (5, 25, 50, 75, 95)} \
        if sides else {}
    return {"sqrt_wh": quantiles, "coco_small": small, "coco_medium": medium, "coco_large": large}


def _split_problems(info: datasets.DatasetInfo, splits: dict) -> list[Problem]:
    """Problems of a split as a whole: no labels at all (the labels folder is missing or misplaced)."""
    out = []
    for split, s in splits.items():
        if s["images"] and s["labelled"] == 0 and s["no_valid_line"] == 0:  # else the line errors say why
            first = datasets.label_path(Path(info.splits[split][0]))
            out.append(Problem("error", "no-labels", str(info.yaml), f"none of the {s['images']} {split} images has a "
                               f"box (looked for labels like {first}); YOLO labels sit in a 'labels' folder beside "
                               "'images'"))
    shared = len(set(info.splits["train"]) & set(info.splits["val"]))
    if shared:
        out.append(Problem("warning", "shared", str(info.yaml), f"train and val share {shared} image files; validation "
                           "scores then measure images the model trained on"))
    return out


def _duplicates(info: datasets.DatasetInfo, images: dict) -> list[Problem]:
    """Different files with the same bytes: repeated training images, or validation images leaked from train."""
    by_hash: dict[str, list[str]] = {}
    for path, im in images.items():
        if im.sha1:
            by_hash.setdefault(im.sha1, []).append(path)
    train, val = set(info.splits["train"]), set(info.splits["val"])
    out = []
    for paths in by_hash.values():
        first = paths[0]
        for other in paths[1:]:
            leak = (first in train) != (other in train) or (first in val) != (other in val)
            what = "a train/val leak" if leak else "the image counts twice"
            out.append(Problem("warning", "duplicate", other, f"same content as {first} ({what})"))
    return out


def _orphan_labels(info: datasets.DatasetInfo) -> list[Problem]:
    """Label files in the splits' label folders that no image of any split uses."""
    expected = {datasets.label_path(Path(p)) for paths in info.splits.values() for p in paths}
    folders = {lp.parent for lp in expected}
    out = []
    for folder in sorted(folders):
        for lp in sorted(folder.glob("*.txt")):
            if lp not in expected and lp.name != "classes.txt":
                out.append(Problem("warning", "orphan-label", str(lp), "label file without an image (its image is "
                                   "missing or has another name); it is not used"))
    return out


def cached_check(info: datasets.DatasetInfo) -> CheckResult:
    """check(info), reusing a stored result while the dataset's files, names and this checker are unchanged.

    The key is the dataset fingerprint (file names and sizes) plus the files'
    modification times, so a label edited in place without changing its size
    is checked again too.
    """
    key = hashlib.sha1(json.dumps([info.fingerprint, str(info.yaml), str(info.root), sorted(info.names.items()),
                                   _mtimes(info), CHECK_VERSION]).encode()).hexdigest()[:16]
    path = runtime.home() / "checks" / f"{info.fingerprint}-{key}.json"
    try:
        return CheckResult.from_json(json.loads(path.read_text(encoding="utf-8")))
    except (OSError, ValueError, KeyError, TypeError):
        pass
    result = check(info)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fileio.write_json(path, result.to_json(), indent=None)
    except OSError:
        pass  # an unwritable cache only costs a re-check next time
    return result


def _mtimes(info: datasets.DatasetInfo) -> str:
    h = hashlib.sha1()
    for paths in info.splits.values():
        for p in paths:
            for f in (Path(p), datasets.label_path(Path(p))):
                try:
                    h.update(str(f.stat().st_mtime_ns).encode())
                except OSError:
                    h.update(b"-")
    return h.hexdigest()


def require_trainable(info: datasets.DatasetInfo) -> datasets.DatasetInfo:
    """Run the cached check; refuse a dataset with errors, showing the summary and its problems first.

    Returns info with the check's key figures attached, for the run's dataset entry.
    """
    result = cached_check(info)
    if not result.ok:
        log.info(format_report(result, max_problems=20))
        first = result.errors[0]
        raise DatasetError(
            f"dataset {info.yaml} has {_plural(len(result.errors), 'error')} that would break or silently damage "
            f"training (first: {first.where(info.root)}: {first.message}); fix them, then run "
            f"'detector datasets check {info.yaml}' to confirm"
        )
    from dataclasses import replace

    return replace(info, check=result.figures())


def require_ok(result: CheckResult) -> CheckResult:
    """result when it found no errors; otherwise DatasetError (the caller has shown the report)."""
    if not result.ok:
        raise DatasetError(f"{_plural(len(result.errors), 'error')} in {result.yaml} would break or silently damage "
                           "training; fix the files listed above")
    return result


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def format_report(result: CheckResult, max_problems: int = 50) -> str:
    """The summary and the problems as text, one fact per line."""
    s, root = result.summary, Path(result.root)
    lines = [f"dataset {result.yaml}", f"  root {result.root}, {s['classes']} classes"]
    for split, d in s["splits"].items():
        if split == "val" and s["shared_images"] == d["images"] == s["splits"]["train"]["images"]:
            lines.append(f"  {split}: the same {d['images']} images as train")
            continue
        lines.append(f"  {split}: {d['images']} images, {d['labelled']} labelled, {d['background']} without boxes "
                     f"({d['no_label_file']} no label file, {d['empty_label_file']} empty), {d['boxes']} boxes"
                     + (f", {d['no_valid_line']} with only invalid lines" if d["no_valid_line"] else ""))
        bpi = d["boxes_per_image"]
        if bpi["densest"]:
            lines.append(f"    boxes per image: mean {bpi['mean']}, median {bpi['median']}, max {bpi['max']} "
                         f"({_rel(bpi['densest'], root)})")
        lines += _wrap("    instances per class: ", [f"{n} {c}" for n, c in d["instances"].items()])
        if d["classes_without_instances"]:
            lines += _wrap(f"    classes without instances ({len(d['classes_without_instances'])}): ",
                           d["classes_without_instances"])
    sizes = s["box_sizes"]
    if sizes["sqrt_wh"]:
        q = " ".join(f"{k} {v:.3f}" for k, v in sizes["sqrt_wh"].items())
        lines.append(f"  box size (train), sqrt(w*h) as a fraction of the image: {q}")
        lines.append(f"  box size (train), COCO classes in image pixels: {sizes['coco_small']} small (<32^2), "
                     f"{sizes['coco_medium']} medium, {sizes['coco_large']} large (>=96^2)")
    lines.append(f"  densest image: {s['max_boxes']} boxes in {_rel(s['densest_image'], root)}")
    lines.append(f"problems: {_plural(len(result.errors), 'error')}, {_plural(len(result.warnings), 'warning')}")
    for p in result.problems[:max_problems]:
        lines.append(f"  {p.severity:<7} {p.kind:<14} {p.where(root)}: {p.message}")
    if len(result.problems) > max_problems:
        lines.append(f"  ... and {len(result.problems) - max_problems} more (--json lists all)")
    return "\n".join(lines)


def _rel(path: str | None, root: Path) -> str:
    if path is None:
        return "-"
    try:
        return str(Path(path).relative_to(root))
    except ValueError:
        return path


def _wrap(head: str, items: list[str], width: int = 110) -> list[str]:
    """head + comma-separated items, wrapped under the head's indent."""
    if not items:
        return []
    lines, current = [], head
    indent = " " * (len(head) - len(head.lstrip()) + 2)
    for i, item in enumerate(items):
        piece = item + ("," if i < len(items) - 1 else "")
        if len(current) + len(piece) + 1 > width and current.strip():
            lines.append(current.rstrip())
            current = indent
        current += piece + " "
    lines.append(current.rstrip())
    return lines
