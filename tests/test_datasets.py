"""Dataset tools: check (planted defects in a copy of coco128), convert (COCO, VOC), synth, and train's refusal."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
import yaml
from click.testing import CliRunner

from .conftest import run_cli
from detector.data import check as dataset_check
from detector.data import datasets
from detector.cli import main


def _invoke(args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture
def coco_copy(tmp_path, coco128_yaml) -> Path:
    """Eight labelled coco128 photos (6 train, 2 val) with their real labels, in a fresh folder."""
    src = coco128_yaml.parent
    labelled = sorted(p for p in (src / "labels" / "train2017").glob("*.txt")
                      if (src / "images" / "train2017" / p.with_suffix(".jpg").name).exists())[:8]
    root = tmp_path / "c8"
    for i, label in enumerate(labelled):
        split = "train" if i < 6 else "val"
        for kind, suffix in (("images", ".jpg"), ("labels", ".txt")):
            (root / kind / split).mkdir(parents=True, exist_ok=True)
            shutil.copy(src / kind / "train2017" / (label.stem + suffix), root / kind / split / (label.stem + suffix))
    names = yaml.safe_load(coco128_yaml.read_text())["names"]
    (root / "data.yaml").write_text(yaml.safe_dump({"path": ".", "train": "images/train", "val": "images/val",
                                                   "names": names}))
    return root / "data.yaml"


def _files(data_yaml: Path, split="train"):
    images = sorted((data_yaml.parent / "images" / split).glob("*.jpg"))
    return images, [datasets.label_path(p) for p in images]


def _append(label: Path, line: str) -> int:
    """Append a label line and return its 1-based line number."""
    lines = label.read_text().splitlines()
    label.write_text("\n".join([*lines, line]) + "\n")
    return len(lines) + 1


def _check(data_yaml: Path) -> dataset_check.CheckResult:
    return dataset_check.check(datasets.load(data_yaml))


def _found(result, kind):
    return [(Path(p.file).name, p.line, p.severity) for p in result.problems if p.kind == kind]


def test_clean_copy_of_coco128_has_no_errors(coco_copy):
    result = _check(coco_copy)
    assert result.ok, dataset_check.format_report(result)
    assert result.summary["splits"]["train"]["images"] == 6 and result.summary["splits"]["val"]["images"] == 2
    assert result.summary["shared_images"] == 0


def test_each_planted_label_defect_is_named_with_file_and_line(coco_copy):
    _, labels = _files(coco_copy)
    planted = {
        "fields": (labels[0], _append(labels[0], "0 0.5 0.5 0.1")),
        "class": (labels[1], _append(labels[1], "80 0.5 0.5 0.1 0.1")),
        "coords": (labels[2], _append(labels[2], "0 1.2 0.5 0.1 0.1")),
        "empty-box": (labels[3], _append(labels[3], "0 0.5 0.5 0 0.1")),
    }
    negative = (labels[4], _append(labels[4], "0 0.5 0.5 -0.2 0.1"))
    not_number = (labels[5], _append(labels[5], "0 0.5 x 0.1 0.1"))
    _, val_labels = _files(coco_copy, "val")
    val_labels[0].write_text("0 0.1 0.1 0.3 0.1 0.2 0.4\n1 0.5 0.5 0.2 0.2\n")  # a polygon, then a box line
    result = _check(coco_copy)
    for kind, (label, line) in planted.items():
        assert (label.name, line, "error") in _found(result, kind), (kind, result.problems)
    assert (negative[0].name, negative[1], "error") in _found(result, "empty-box")
    assert (not_number[0].name, not_number[1], "error") in _found(result, "fields")
    assert (val_labels[0].name, 2, "error") in _found(result, "mixed")
    assert len(result.errors) == 7 and not result.ok


def test_truncated_and_unreadable_images_are_errors(coco_copy):
    images, _ = _files(coco_copy)
    data = images[0].read_bytes()
    images[0].write_bytes(data[: len(data) // 2])  # a truncated JPEG: header fine, scan data cut off
    images[1].write_bytes(b"this is not an image")
    cv2.imwrite(str(images[2]), np.zeros((8, 8, 3), np.uint8))  # a real JPEG, too small for Ultralytics
    found = _found(_check(coco_copy), "image")
    assert {(im.name, None, "error") for im in images[:3]} <= set(found) and len(found) == 3


def test_duplicates_orphans_and_repeated_lines_are_warnings(coco_copy):
    images, labels = _files(coco_copy)
    val_images, _ = _files(coco_copy, "val")
    shutil.copy(images[0], images[0].with_name("copy.jpg"))  # same bytes, another name, in train
    shutil.copy(labels[0], labels[0].with_name("copy.txt"))
    shutil.copy(images[1], val_images[0].with_name("leak.jpg"))  # a train image inside val
    orphan = labels[0].with_name("no_such_image.txt")
    orphan.write_text("0 0.5 0.5 0.1 0.1\n")
    first = labels[2].read_text().splitlines()[0]
    repeat = _append(labels[2], first)
    images[3].write_bytes(images[3].read_bytes() + b"\0" * 16)  # decodes fine, but no end marker last
    result = _check(coco_copy)
    assert result.ok  # warnings only: training works as the user meant
    dups = {name: p.message for name, p in ((Path(p.file).name, p) for p in result.problems if p.kind == "duplicate")}
    assert "the image counts twice" in dups["copy.jpg"] and images[0].name in dups["copy.jpg"]
    assert "train/val leak" in dups["leak.jpg"]
    assert ("no_such_image.txt", None, "warning") in _found(result, "orphan-label")
    assert (labels[2].name, repeat, "warning") in _found(result, "duplicate-line")
    assert _found(result, "jpeg-end") == [(images[3].name, None, "warning")]


def test_split_without_labels_is_an_error(coco_copy):
    shutil.rmtree(coco_copy.parent / "labels" / "val")
    result = _check(coco_copy)
    assert [p.kind for p in result.errors] == ["no-labels"]
    assert "val" in result.errors[0].message and result.summary["splits"]["val"]["no_label_file"] == 2


def test_check_command_exit_codes_text_and_json(coco_copy):
    _, labels = _files(coco_copy)
    line = _append(labels[1], "80 0.5 0.5 0.1 0.1")
    result = _invoke(["datasets", "check", coco_copy])
    assert result.exit_code == 1
    assert f"labels/train/{labels[1].name}:{line}: class id 80 is out of range" in result.output
    assert "1 error in" in result.output.splitlines()[-1]
    as_json = _invoke(["datasets", "check", coco_copy, "--json"])
    report = json.loads(as_json.stdout)
    assert report["errors"] == 1 and report["problems"][0]["line"] == line
    assert report["problems"][0]["file"] == str(labels[1].resolve())


def test_check_on_coco128_passes_via_entry_point(coco128_yaml, tmp_path):
    proc = run_cli(["datasets", "check", str(coco128_yaml), "--json"], tmp_path, timeout=120)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    s = report["summary"]
    assert report["ok"] and s["splits"]["train"]["images"] == 128 and s["splits"]["train"]["boxes"] == 929
    assert s["max_boxes"] == 42 and s["densest_image"].endswith("000000000196.jpg")
    assert s["splits"]["train"]["instances"]["person"] == 254
    assert report["seconds"] < 10  # ~0.2-0.6 s on the 2-core machine; loose for a busy CI


def test_cache_is_keyed_by_fingerprint_and_modification_time(coco_copy, detector_home):
    info = datasets.load(coco_copy)
    assert dataset_check.cached_check(info).ok
    stored = list((detector_home / "checks").glob(f"{info.fingerprint}-*.json"))
    assert len(stored) == 1
    _, labels = _files(coco_copy)
    text = labels[0].read_text()
    st = labels[0].stat()
    cls = text.split()[0]
    # an in-place edit of the same size: the class id becomes 'x', so line 1 breaks but the fingerprint does not
    labels[0].write_text(text.replace(cls + " ", "x" * len(cls) + " ", 1))
    os.utime(labels[0], ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    again = datasets.load(coco_copy)
    assert again.fingerprint == info.fingerprint
    result = dataset_check.cached_check(again)
    assert (labels[0].name, 1) in [(Path(p.file).name, p.line) for p in result.errors]


def _image(path: Path, width: int, height: int, seed: int) -> None:
    """A distinct real PNG of the given size (noise, so no two test images share bytes)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    cv2.imwrite(str(path), rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def _coco_fixture(tmp_path: Path) -> tuple[Path, Path]:
    """A COCO instances JSON with non-contiguous, unsorted category ids, a crowd box, a clipped and an empty box."""
    images = tmp_path / "coco-images"
    _image(images / "a.png", 100, 80, 1)
    _image(images / "b.png", 64, 48, 2)
    _image(images / "c.png", 50, 50, 3)  # no annotations: a background image
    doc = {
        "categories": [{"id": 7, "name": "kite"}, {"id": 1, "name": "person"}, {"id": 3, "name": "car"}],
        "images": [{"id": 10, "file_name": "a.png", "width": 100, "height": 80},
                   {"id": 11, "file_name": "b.png", "width": 64, "height": 48},
                   {"id": 12, "file_name": "c.png", "width": 50, "height": 50}],
        "annotations": [
            {"id": 1, "image_id": 10, "category_id": 3, "bbox": [10, 20, 30, 40], "iscrowd": 0},
            {"id": 2, "image_id": 10, "category_id": 7, "bbox": [0, 0, 100, 80], "iscrowd": 0},
            {"id": 3, "image_id": 10, "category_id": 1, "bbox": [50, 40, 20, 20], "iscrowd": 1},
            {"id": 4, "image_id": 11, "category_id": 1, "bbox": [48, 36, 32, 24], "iscrowd": 0},  # past the corner
            {"id": 5, "image_id": 11, "category_id": 1, "bbox": [5, 5, 0, 10], "iscrowd": 0},  # empty
        ],
    }
    instances = tmp_path / "instances.json"
    instances.write_text(json.dumps(doc))
    return instances, images


def test_coco_conversion_box_by_box(tmp_path):
    instances, images = _coco_fixture(tmp_path)
    out = tmp_path / "yolo"
    result = _invoke(["datasets", "convert", "--from", "coco", instances, "--images", images, "--out", out])
    assert result.exit_code == 0, result.output
    data = yaml.safe_load((out / "data.yaml").read_text())
    assert data["names"] == {0: "person", 1: "car", 2: "kite"}  # ascending category id: 1, 3, 7
    assert data["train"] == data["val"] == "images/train"
    labels = out / "labels" / "train"
    assert (labels / "a.txt").read_text() == "1 0.250000 0.500000 0.300000 0.500000\n2 0.500000 0.500000 1.000000 1.000000\n"
    assert (labels / "b.txt").read_text() == "0 0.875000 0.875000 0.250000 0.250000\n"  # clipped to 48..64, 36..48
    assert (labels / "c.txt").read_text() == ""
    assert "skipped 1 crowd annotation (keep with --keep-crowd)" in result.output and "skipped 1 box empty" in result.output
    assert "1->0 person, 3->1 car, 7->2 kite" in result.output and "(copy)" in result.output
    assert (out / "images" / "train" / "a.png").is_file() and not (out / "images" / "train" / "a.png").is_symlink()
    assert "problems: 0 errors" in result.output


def test_coco_keep_crowd_and_symlink(tmp_path):
    instances, images = _coco_fixture(tmp_path)
    out = tmp_path / "yolo"
    result = _invoke(["datasets", "convert", "--from", "coco", instances, "--images", images, "--out", out,
                      "--keep-crowd", "--symlink"])
    assert result.exit_code == 0, result.output
    assert (out / "labels" / "train" / "a.txt").read_text().splitlines()[-1] == "0 0.600000 0.625000 0.200000 0.250000"
    assert (out / "images" / "train" / "a.png").resolve() == (images / "a.png").resolve()
    assert (out / "images" / "train" / "a.png").is_symlink() and "(symlink)" in result.output


def _voc_xml(path: Path, filename: str, size, objects) -> None:
    objs = "".join(
        f"<object><name>{n}</name><difficult>{d}</difficult><bndbox><xmin>{b[0]}</xmin><ymin>{b[1]}</ymin>"
        f"<xmax>{b[2]}</xmax><ymax>{b[3]}</ymax></bndbox></object>" for n, d, b in objects)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"<annotation><filename>{filename}</filename><size><width>{size[0]}</width>"
                    f"<height>{size[1]}</height><depth>3</depth></size>{objs}</annotation>")


def test_voc_conversion_box_by_box_then_val_split(tmp_path):
    ann, images = tmp_path / "Annotations", tmp_path / "JPEGImages"
    _image(images / "x.png", 100, 80, 4)
    _image(images / "y.png", 40, 40, 5)
    _voc_xml(ann / "x.xml", "x.png", (100, 80), [("dog", 0, (11, 21, 40, 60)), ("cat", 1, (1, 1, 10, 10))])
    _voc_xml(ann / "y.xml", "y.png", (40, 40), [("cat", 0, (1, 1, 40, 40))])
    out = tmp_path / "voc-yolo"
    result = _invoke(["datasets", "convert", "--from", "voc", ann, "--images", images, "--out", out])
    assert result.exit_code == 0, result.output
    assert yaml.safe_load((out / "data.yaml").read_text())["names"] == {0: "cat", 1: "dog"}  # alphabetical
    # VOC corners are 1-based pixel indices: xmin 11..xmax 40 spans pixels 10..40
    assert (out / "labels" / "train" / "x.txt").read_text() == "1 0.250000 0.500000 0.300000 0.500000\n"
    assert (out / "labels" / "train" / "y.txt").read_text() == "0 0.500000 0.500000 1.000000 1.000000\n"
    assert "skipped 1 difficult object" in result.output
    # the same annotations again as the val split of the same dataset
    again = _invoke(["datasets", "convert", "--from", "voc", ann, "--images", images, "--out", out, "--split", "val",
                     "--keep-difficult"])
    assert again.exit_code == 0, again.output
    data = yaml.safe_load((out / "data.yaml").read_text())
    assert (data["train"], data["val"]) == ("images/train", "images/val")
    assert (out / "labels" / "val" / "x.txt").read_text().splitlines()[1] == "0 0.050000 0.062500 0.100000 0.125000"
    refused = _invoke(["datasets", "convert", "--from", "voc", ann, "--images", images, "--out", out])
    assert refused.exit_code == 1 and "already holds files" in refused.output


def test_synth_command_writes_the_generator_dataset(tmp_path, detector_home):
    out = tmp_path / "shapes"
    result = _invoke(["datasets", "synth", "--images", "8", "--imgsz", "64", "--seed", "1", "--out", out])
    assert result.exit_code == 0, result.output
    assert len(list((out / "images" / "train").glob("*.png"))) == 8
    assert len(list((out / "labels" / "val").glob("*.txt"))) == 2
    assert _check(out / "data.yaml").ok
    cached = _invoke(["datasets", "synth", "--images", "4", "--imgsz", "64"])
    assert cached.exit_code == 0 and str(detector_home / "datasets" / "shapes-64px-4-1-s0-") in cached.output
    foreign = tmp_path / "mine"
    (foreign / "keep.txt").parent.mkdir()
    (foreign / "keep.txt").write_text("precious")
    refused = _invoke(["datasets", "synth", "--images", "4", "--out", foreign])
    assert refused.exit_code == 1 and "not a built-in dataset" in refused.output
    assert (foreign / "keep.txt").read_text() == "precious"


def test_train_refuses_a_broken_dataset_without_a_run_folder(coco_copy, tmp_path):
    _, labels = _files(coco_copy)
    line = _append(labels[0], "0 0.5 0.5 0.1")
    project = tmp_path / "runs"
    result = _invoke(["train", "--data", coco_copy, "--epochs", "1", "--imgsz", "64", "--project", project,
                      "--name", "broken"])
    assert result.exit_code == 1
    last = result.output.strip().splitlines()[-1]
    assert last.startswith("Error: dataset ") and f"labels/train/{labels[0].name}:{line}" in last
    assert "instances per class" in result.output  # the summary is shown before the refusal
    assert not project.exists()


def test_converted_dataset_trains_and_the_run_records_the_check(tmp_path):
    instances, images = _coco_fixture(tmp_path)
    out = tmp_path / "yolo"
    assert _invoke(["datasets", "convert", "--from", "coco", instances, "--images", images, "--out", out]).exit_code == 0
    result = _invoke(["train", "--data", out / "data.yaml", "--epochs", "1", "--imgsz", "64", "--batch", "2",
                      "--workers", "0", "--project", tmp_path / "runs", "--name", "conv", "plots=False"])
    assert result.exit_code == 0, result.output + repr(result.exception)
    run = json.loads((tmp_path / "runs" / "conv" / "run.json").read_text())
    assert run["status"] == "completed"
    assert run["dataset"]["check"]["max_boxes_per_image"] == 2
    assert run["dataset"]["check"]["densest_image"].endswith("a.png") and run["dataset"]["check"]["errors"] == 0
