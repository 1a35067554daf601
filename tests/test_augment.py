"""Albumentations pipelines: boxes follow the pixels, seeds fix batches, bad pipelines are refused, runs record them."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from detector.augment import pipelines as augment
from detector.data import datasets
from detector.augment import preview
from detector.yolo import loader
from detector.cli import main
from detector.errors import AugmentError

from .conftest import detector_exe, guarded_env, run_cli

import albumentations as A  # noqa: E402  (after detector.yolo set the offline environment)


def save_pipeline(path: Path, transforms: list) -> Path:
    """A pipeline file exactly as a user writes one: A.save of a Compose (bbox_params ignored by us)."""
    A.save(A.Compose(transforms, bbox_params=A.BboxParams(format="pascal_voc")), str(path),
           data_format="yaml" if path.suffix == ".yaml" else "json")
    return path


def save_raw(path: Path, *nodes: dict) -> Path:
    """A pipeline file written by hand (what a typo or a stale file looks like)."""
    path.write_text(json.dumps({"__version__": A.__version__,
                                "transform": {"__class_fullname__": "Compose", "p": 1.0, "transforms": list(nodes)}}))
    return path


def object_box(image: np.ndarray) -> np.ndarray:
    """xyxy pixel box around the white object of a synthetic image."""
    ys, xs = np.nonzero(image[..., 0] > 200)
    return np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=float)


def iou(a, b) -> float:
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = w * h
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


# -- boxes follow the object -----------------------------------------------------------------------------------------

def test_flip_and_crop_keep_the_box_on_the_object(tmp_path):
    size = 128
    image = np.zeros((size, size, 3), dtype=np.uint8)
    image[30:60, 12:52] = 255  # a white object...
    image[30:60, 12:22, 1:] = 0  # ...with a red left edge, so a flip shows
    box = [12.0, 30.0, 52.0, 60.0]
    file = save_pipeline(tmp_path / "flipcrop.yaml", [
        A.HorizontalFlip(p=1.0),
        A.RandomSizedBBoxSafeCrop(height=size, width=size, erosion_rate=0.0, p=1.0),  # crops, keeps size and boxes
    ])
    pipeline = augment.resolve(file, size)
    moved = []
    for seed in range(5):
        out_image, out_boxes, out_cls = loader.augment_sample(list(pipeline.transforms), image.copy(), [box], [2],
                                                            seed=seed)
        assert out_image.shape == (size, size, 3)
        assert list(out_cls) == [2] and len(out_boxes) == 1
        truth = object_box(out_image)
        assert iou(out_boxes[0], truth) > 0.9, (seed, out_boxes[0], truth)
        red_x = np.nonzero((out_image[..., 0] > 200) & (out_image[..., 1] < 60))[1]
        moved.append(red_x.mean() > (truth[0] + truth[2]) / 2)  # the red edge is now on the object's right
    assert all(moved)


# -- determinism -----------------------------------------------------------------------------------------------------

def first_batch(tiny_data: Path, tmp_path: Path, seed: int) -> dict:
    data_yaml = datasets.load(tiny_data).write_resolved(tmp_path / f"data-{seed}.yaml")
    pipeline = augment.resolve("heavy", 64)
    return loader.augmented_batch(data_yaml, list(pipeline.transforms), 64, 8, seed=seed, overrides={"mosaic": 1.0})


def test_same_seed_same_batch(tiny_data, tmp_path):
    a, b, other = (first_batch(tiny_data, tmp_path, s) for s in (7, 7, 8))
    assert a["images"].shape == (8, 64, 64, 3)
    for key in ("images", "bboxes", "cls", "batch_idx"):
        np.testing.assert_array_equal(a[key], b[key])
    assert a["files"] == b["files"]
    assert not np.array_equal(a["images"], other["images"])


# -- validation ------------------------------------------------------------------------------------------------------

BAD = [
    ({"__class_fullname__": "GaussianBlurr", "p": 0.5}, "unknown transform 'GaussianBlurr'"),
    ({"__class_fullname__": "Blur", "blur_limit": "wide", "p": 0.5}, "bad parameter for Blur: blur_limit"),
    ({"__class_fullname__": "Blur", "radius": 3, "p": 0.5}, "bad parameter for Blur: it takes no argument 'radius'"),
    ({"__class_fullname__": "RandomCrop", "height": 32, "width": 32, "p": 0.1},
     "RandomCrop changes the image size from 64x64 to 32x32"),
    ({"__class_fullname__": "PadIfNeeded", "min_height": 96, "min_width": 96, "p": 1.0},
     "PadIfNeeded changes the image size from 64x64 to 96x96"),
    ({"__class_fullname__": "RandomScale", "scale_limit": 0.2, "p": 0.5}, "RandomScale changes the image size"),
    ({"__class_fullname__": "OneOf", "p": 0.5, "transforms": [
        {"__class_fullname__": "Blur", "p": 1.0},
        {"__class_fullname__": "Resize", "height": 48, "width": 48, "p": 1.0}]},
     "Resize changes the image size from 64x64 to 48x48"),
    ({"__class_fullname__": "Lambda", "name": "mine", "p": 1.0}, "Lambda cannot be serialized"),
    ({"__class_fullname__": "OverlayElements", "p": 0.5},
     "OverlayElements moves pixels but cannot move bounding boxes"),
    ({"__class_fullname__": "Normalize", "p": 1.0}, "Normalize turns the uint8 image into float32"),
    ({"__class_fullname__": "ToTensorV2", "p": 1.0}, "ToTensorV2 is not a 2D image transform"),
    ({"__class_fullname__": "MaskDropout", "p": 0.5}, "MaskDropout fails on a training image"),
]


@pytest.mark.parametrize("node,message", BAD, ids=[m.split(" ")[0] + "-" + n["__class_fullname__"] for n, m in BAD])
def test_bad_transform_is_refused_naming_it(tmp_path, node, message):
    file = save_raw(tmp_path / "bad.json", {"__class_fullname__": "HorizontalFlip", "p": 0.5}, node)
    with pytest.raises(AugmentError) as info:
        augment.resolve(file, 64)
    assert message in str(info.value)
    assert str(file.resolve()) in str(info.value) and "\n" not in str(info.value)


def test_saved_pipelines_that_albumentations_reads_with_warnings_are_accepted(tmp_path):
    # A.to_dict(SafeRotate) writes Affine's fields, which A.load then warns about: not the user's mistake
    file = save_pipeline(tmp_path / "rot.yaml", [A.SafeRotate(limit=10, p=0.5), A.GaussNoise(p=0.1)])
    assert [t["transform"]["__class_fullname__"] for t in augment.resolve(file, 64).transforms] == ["SafeRotate",
                                                                                                   "GaussNoise"]


def test_size_preserving_crop_is_accepted_at_its_own_size(tmp_path):
    file = save_pipeline(tmp_path / "crop.json", [A.RandomResizedCrop(size=(64, 64), p=0.5)])
    assert augment.resolve(file, 64).transforms[0]["transform"]["__class_fullname__"] == "RandomResizedCrop"
    with pytest.raises(AugmentError, match="RandomResizedCrop changes the image size from 96x96 to 64x64"):
        augment.resolve(file, 96)


@pytest.mark.parametrize("content,message", [
    (None, "no such file and not a preset"),
    ("transform: [unclosed", "is not valid YAML"),
    ("lr0: 0.01\n", "is not an Albumentations pipeline"),
])
def test_unreadable_pipeline_files_are_refused(tmp_path, content, message):
    file = tmp_path / "pipe.yaml"
    if content is not None:
        file.write_text(content)
    with pytest.raises(AugmentError, match=message):
        augment.resolve(file, 64)


def test_cli_refuses_with_one_line_and_train_leaves_no_run_folder(tmp_path, tiny_data):
    file = save_raw(tmp_path / "bad.json", {"__class_fullname__": "Lambda", "name": "x", "p": 1.0})
    result = CliRunner().invoke(main, ["augment", "check", str(file), "--imgsz", "64"])
    assert result.exit_code == 1
    assert result.output.strip().count("\n") == 0 and result.output.startswith("Error: ") and "Lambda" in result.output
    project = tmp_path / "runs"
    result = CliRunner().invoke(main, ["train", "--data", str(tiny_data), "--imgsz", "64", "--epochs", "1",
                                       "--augment", str(file), "--project", str(project), "--name", "x"])
    assert result.exit_code == 1 and "Lambda cannot be serialized" in result.output
    assert not (project / "x").exists()


def test_presets_are_valid_and_ultralytics_preset_is_its_default():
    for name in augment.PRESETS:
        assert augment.preset_path(name).is_file()
        augment.resolve(name, 64)
    assert list(augment.resolve("ultralytics", 640).transforms) == loader.default_albumentations()
    assert augment.resolve("none", 64).transforms == ()


# -- preview ---------------------------------------------------------------------------------------------------------

def test_preview_writes_a_grid_of_the_batch(tiny_data, tmp_path):
    import cv2

    out = tmp_path / "sub" / "grid.png"
    result = CliRunner().invoke(main, ["augment", "preview", "--data", str(tiny_data), "--augment", "light",
                                       "--batch", "5", "--imgsz", "64", "--seed", "3", "--out", str(out)])
    assert result.exit_code == 0, result.output
    grid = cv2.imread(str(out))
    rows, cols = preview.grid_shape(5)
    assert (rows, cols) == (2, 3) and grid.shape == (rows * 64, cols * 64, 3)
    assert "wrote" in result.output and "5 images" in result.output
    assert (grid[64:, 128:] == 114).all()  # the sixth tile is empty
    # boxes were drawn: the same batch drawn without boxes differs
    batch = loader.augmented_batch(datasets.load(tiny_data).write_resolved(tmp_path / "d.yaml"),
                                 list(augment.resolve("light", 64).transforms), 64, 5, seed=3)
    bare = preview.draw_grid({**batch, "cls": batch["cls"][:0], "batch_idx": batch["batch_idx"][:0],
                              "bboxes": batch["bboxes"][:0]})
    drawn = preview.draw_grid(batch)
    assert bare.shape == drawn.shape and not np.array_equal(bare, drawn)


# -- training records the pipeline, and --resume keeps it ------------------------------------------------------------

def test_training_records_the_pipeline_and_resume_keeps_it(tiny_data, tmp_path):
    project, name = tmp_path / "runs", "aug"
    run_dir = project / name
    args = [detector_exe(), "train", "--data", str(tiny_data), "--epochs", "2", "--imgsz", "64", "--batch", "8",
            "--project", str(project), "--name", name, "--augment", "light", "plots=False", "val=False"]
    proc = subprocess.Popen(args, env=guarded_env(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:  # stop it during epoch 2, after epoch 1 is saved
        csv = run_dir / "iterations.csv"
        rows = csv.read_text().splitlines()[1:] if csv.exists() else []
        if any(r.split(",")[0] == "2" for r in rows):
            proc.send_signal(signal.SIGTERM)
            break
        time.sleep(0.05)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]

    run = json.loads((run_dir / "run.json").read_text())
    expected = A.to_dict(A.Compose([A.from_dict(t) for t in augment.resolve("light", 64).transforms]))
    assert run["augmentations"] == json.loads(json.dumps(expected))
    assert run["config"]["augment"] == "light"
    assert augment.from_record(run["augmentations"]).transforms == augment.resolve("light", 64).transforms
    restored = A.from_dict(run["augmentations"])  # the record is what A.load reads
    assert [type(t).__name__ for t in restored.transforms] == ["RandomBrightnessContrast", "OneOf", "ToGray", "CLAHE"]
    assert "RandomBrightnessContrast(p=0.3" in out + err  # Ultralytics' own Albumentations step logged our pipeline

    refused = run_cli(["train", "--resume", str(run_dir), "--augment", "heavy"], tmp_path)
    assert refused.returncode == 2 and "--augment cannot change a resumed run" in refused.stderr
    resumed = run_cli(["train", "--resume", str(run_dir)], tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "RandomBrightnessContrast(p=0.3" in resumed.stdout + resumed.stderr  # restored from last.pt's args
    assert json.loads((run_dir / "run.json").read_text())["status"] == "completed"


def test_default_run_records_the_ultralytics_preset(tiny_run):
    run = json.loads((tiny_run / "run.json").read_text())
    names = [t["__class_fullname__"] for t in run["augmentations"]["transform"]["transforms"]]
    assert names == ["Blur", "MedianBlur", "ToGray", "CLAHE", "RandomBrightnessContrast", "RandomGamma",
                     "ImageCompression"]
