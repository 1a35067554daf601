"""COCO-compatible predictions and COCO evaluation, scored end to end with pycocotools
against a small COCO annotation file the tests write from the tiny dataset's val labels."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from detector.cli import main

pytest.importorskip("pycocotools")
from pycocotools.coco import COCO  # noqa: E402

# Deliberately not the class indices: COCO ids are the annotation file's, matched by name.
CATEGORY_IDS = {"circle": 17, "square": 3, "triangle": 90, "cross": 44}


def write_coco_gt(data_yaml: Path, out: Path, drop: int = 0) -> Path:
    """A COCO instances file for the val split of a YOLO dataset (the last `drop` images left out)."""
    import cv2

    data = yaml.safe_load(data_yaml.read_text())
    root = Path(data["path"])
    images, annotations = [], []
    files = sorted((root / data["val"]).glob("*.*"))
    for n, image in enumerate(files[: len(files) - drop]):
        h, w = cv2.imread(str(image)).shape[:2]
        image_id = 5000 + 7 * n  # ids unrelated to list positions
        images.append({"id": image_id, "file_name": image.name, "width": w, "height": h})
        label = root / "labels" / "val" / f"{image.stem}.txt"
        for line in label.read_text().split("\n") if label.exists() else []:
            if not line.strip():
                continue
            c, x, y, bw, bh = map(float, line.split())
            box = [(x - bw / 2) * w, (y - bh / 2) * h, bw * w, bh * h]
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "bbox": box, "area": box[2] * box[3],
                                "iscrowd": 0, "category_id": CATEGORY_IDS[data["names"][int(c)]]})
    categories = [{"id": i, "name": name.upper() if name == "cross" else name, "supercategory": "shape"}
                  for name, i in CATEGORY_IDS.items()]  # a name in other case still matches
    out.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    return out


@pytest.fixture(scope="module")
def coco_gt(tiny_data, tmp_path_factory) -> Path:
    return write_coco_gt(tiny_data, tmp_path_factory.mktemp("coco") / "instances.json")


def _val_dir(data_yaml: Path) -> Path:
    data = yaml.safe_load(data_yaml.read_text())
    return Path(data["path"]) / data["val"]


def test_predict_with_coco_gt_loads_in_pycocotools(tiny_run, tiny_data, coco_gt, tmp_path):
    out = tmp_path / "preds"
    result = CliRunner().invoke(main, ["predict", str(tiny_run), str(_val_dir(tiny_data)), "--out", str(out),
                                       "--conf", "0.001", "--no-images", "--coco-gt", str(coco_gt)])
    assert result.exit_code == 0, result.output + repr(result.exception)
    rows = json.loads((out / "predictions.json").read_text())
    assert rows, "an early model still has boxes at conf 0.001"
    gt = json.loads(coco_gt.read_text())
    by_name = {im["file_name"]: im["id"] for im in gt["images"]}
    for r in rows:
        assert r["image_id"] == by_name[r["file_name"]]
        assert r["category_id"] == CATEGORY_IDS[r["category_name"]]
    coco = COCO(str(coco_gt))
    dt = coco.loadRes(str(out / "predictions.json"))  # the file loads as COCO results, as pycocotools needs
    assert len(dt.getAnnIds()) == len(rows)


def test_predict_coco_gt_refuses_an_unlisted_image(tiny_run, tiny_data, tmp_path):
    partial = write_coco_gt(tiny_data, tmp_path / "partial.json", drop=1)
    out = tmp_path / "preds"
    result = CliRunner().invoke(main, ["predict", str(tiny_run), str(_val_dir(tiny_data)), "--out", str(out),
                                       "--coco-gt", str(partial)])
    assert result.exit_code == 1
    assert result.output.count("\n") == 1 and "is not in" in result.output and "partial.json" in result.output
    assert not out.exists()


def test_predict_coco_gt_refuses_a_file_that_is_not_coco(tiny_run, tiny_data, tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"images": []}))
    result = CliRunner().invoke(main, ["predict", str(tiny_run), str(_val_dir(tiny_data)), "--out",
                                       str(tmp_path / "p"), "--coco-gt", str(bad)])
    assert result.exit_code == 1 and result.output.count("\n") == 1 and "COCO instances" in result.output
    assert not (tmp_path / "p").exists()


def test_coco_scoring_perfect_and_shifted_boxes(coco_gt):
    # The scoring path alone: the annotation boxes as detections score 1.0; boxes shifted by half their
    # width score far lower.
    from detector.deploy import coco

    gt = json.loads(coco_gt.read_text())
    perfect = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 0.9}
               for a in gt["annotations"]]
    assert coco.evaluate(coco_gt, perfect)["AP"] == pytest.approx(1.0)
    shifted = [{**d, "bbox": [d["bbox"][0] + d["bbox"][2] / 2, *d["bbox"][1:]]} for d in perfect]
    scores = coco.evaluate(coco_gt, shifted)
    assert 0 <= scores["AP"] < 0.3 and len(scores) == 12


def test_val_shows_ultralytics_and_coco_side_by_side(tiny_run, tiny_data, coco_gt):
    result = CliRunner().invoke(main, ["val", str(tiny_run), "--data", str(tiny_data), "--coco-gt", str(coco_gt)])
    assert result.exit_code == 0, result.output + repr(result.exception)
    out = result.output
    assert "Ultralytics (16 val images): mAP50-95" in out and "They differ" in out
    for name in ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl"):
        assert f"  {name} " in out
    result = CliRunner().invoke(main, ["val", str(tiny_run), "--coco-gt", str(coco_gt), "--json"])
    assert result.exit_code == 0, result.output
    figures = json.loads(result.output)
    epochs = (tiny_run / "epochs.csv").read_text().splitlines()
    assert figures["coco"]["images"] == 16 and figures["coco"]["detections"] > 0
    assert 0 <= figures["ultralytics"]["map50_95"] <= 1 and len(epochs) == 3


def test_val_refuses_coco_gt_without_matching_images(tiny_run, tmp_path):
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"images": [{"id": 1, "file_name": "elsewhere.jpg"}],
                                 "categories": [{"id": 1, "name": "circle"}]}))
    result = CliRunner().invoke(main, ["val", str(tiny_run), "--coco-gt", str(other)])
    assert result.exit_code == 1 and result.output.count("\n") == 1 and "none of the 16 val images" in result.output
