"""`detector export` and `detector predict` on a real tiny training: parity, ONNX meaning, outputs, bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner

from detector.deploy import export
from detector.deploy import parity
from detector.data import sources
from detector.cli import main

from .conftest import run_cli

STRIDES = (8, 16, 32)
REG_MAX = 16  # YOLO11's DFL bins: each box side is at most REG_MAX - 1 strides from its anchor


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def one_line_error(result) -> str:
    """The command failed with exactly one 'Error: ...' line (progress lines may come before it)."""
    assert result.exit_code != 0, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and result.output.rstrip().endswith(errors[0]), result.output
    assert "Traceback" not in result.output
    return errors[0]


@pytest.fixture(scope="module")
def run_copy(tiny_run, tmp_path_factory) -> Path:
    """The shared tiny run copied, so exports never write into the session fixture's folder."""
    return Path(shutil.copytree(tiny_run, tmp_path_factory.mktemp("export") / "tiny"))


@pytest.fixture(scope="module")
def exported(run_copy) -> Path:
    """The run's best.pt exported to ONNX by the CLI with its defaults (parity included)."""
    result = invoke("export", run_copy, "--imgsz", 64)
    assert result.exit_code == 0, result.output + repr(result.exception)
    onnx_file = run_copy / "weights" / "best.onnx"
    assert onnx_file.is_file() and f"Exported: {onnx_file}" in result.output
    return onnx_file


@pytest.fixture(scope="module")
def names(run_copy) -> dict:
    return {int(k): v for k, v in json.loads((run_copy / "run.json").read_text())["dataset"]["names"].items()}


def val_images(run_copy) -> Path:
    return Path(json.loads((run_copy / "run.json").read_text())["dataset"]["root"]) / "images" / "val"


def test_export_json_has_format_size_parity_and_latency(exported):
    record = json.loads((exported.parent / "export.json").read_text())
    assert record["format"] == "onnx" and record["file"] == "best.onnx" and record["imgsz"] == 64
    assert record["opset"] == onnx.load(str(exported)).opset_import[0].version >= 9
    assert record["file_size_bytes"] == exported.stat().st_size > 100_000
    p = record["parity"]
    assert p["passed"] is True and p["images"] == 8 and len(p["image_files"]) == 8
    assert all("/images/val/" in f for f in p["image_files"])  # the run's val set by default
    assert p["conf"] == 0.001 and p["iou_match"] == 0.9
    assert p["boxes_compared"] == p["boxes_pt"] + p["boxes_export"] > 0  # a low conf leaves boxes to compare
    assert p["matched_final"] + p["matched_candidates"] == p["boxes_compared"] and p["unmatched"] == []
    assert 0 <= p["max_abs_diff"] < 1e-2  # float32 export: rounding-level differences only
    assert p["max_abs_diff_scores"] < 1e-4 and p["score_tolerance"] == 0.01
    lat = record["latency_ms_per_image"]
    assert lat["pt"] > 0 and lat["export"] > 0 and lat["batch"] == 1 and lat["device"] == "cpu"


def test_onnx_output_read_directly_is_pixel_xywh_and_scores(exported, names, run_copy):
    session = ort.InferenceSession(str(exported), providers=["CPUExecutionProvider"])
    (inp,), (out,) = session.get_inputs(), session.get_outputs()
    anchors = sum((64 // s) ** 2 for s in STRIDES)
    assert inp.shape == [1, 3, 64, 64] and out.shape == [1, 4 + len(names), anchors]

    image_file = sorted(val_images(run_copy).glob("*.png"))[0]
    bgr = cv2.imread(str(image_file))
    assert bgr.shape[:2] == (64, 64)  # no letterbox padding: input pixels are image pixels
    x = np.ascontiguousarray(bgr[..., ::-1].transpose(2, 0, 1)[None], dtype=np.float32) / 255
    (y,) = session.run(None, {inp.name: x})
    assert y.shape == (1, 4 + len(names), anchors)
    scores = y[0, 4:]
    assert scores.min() >= 0 and scores.max() <= 1  # sigmoid class scores, no objectness
    # Boxes are centre x, y, width, height in input pixels around each anchor of the stride grids.
    grid = np.concatenate([np.stack(np.meshgrid(np.arange(64 // s) + 0.5, np.arange(64 // s) + 0.5), -1)
                           .reshape(-1, 2) * s for s in STRIDES])
    stride = np.concatenate([np.full((64 // s) ** 2, s) for s in STRIDES])
    cxcy, wh = y[0, :2].T, y[0, 2:4].T
    assert np.all(np.abs(cxcy - grid) <= (REG_MAX - 1) / 2 * stride[:, None] + 1e-3)
    assert np.all(wh >= 0) and np.all(wh <= 2 * (REG_MAX - 1) * stride[:, None] + 1e-3)

    # The best-scoring raw box is what the .pt reports for this image (NMS always keeps the top box).
    best = scores.max(0).argmax()
    cx, cy, w, h = y[0, :4, best]
    expected = np.clip([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], 0, 64)
    out_dir = exported.parent.parent / "pred-one"
    result = invoke("predict", run_copy / "weights" / "best.pt", image_file, "--out", out_dir, "--conf", 0.0001)
    assert result.exit_code == 0, result.output
    top = max(json.loads((out_dir / "predictions.json").read_text()), key=lambda r: r["score"])
    bx, by, bw, bh = top["bbox"]
    assert top["category_id"] == int(scores[:, best].argmax()) and top["score"] == pytest.approx(scores.max(), abs=1e-4)
    np.testing.assert_allclose([bx, by, bx + bw, by + bh], expected, atol=0.01)


def test_predict_pt_and_onnx_write_the_same_detections(exported, run_copy, names, tmp_path):
    outputs = {}
    for weights in (run_copy / "weights" / "best.pt", exported):
        out = tmp_path / weights.suffix[1:]
        result = invoke("predict", weights, val_images(run_copy), "--out", out, "--conf", 0.001)
        assert result.exit_code == 0, result.output
        rows = json.loads((out / "predictions.json").read_text())
        csv_lines = (out / "predictions.csv").read_text().splitlines()
        assert csv_lines[0] == "image_id,file_name,category_id,category_name,score,x,y,w,h"
        assert len(csv_lines) == len(rows) + 1
        assert sorted(p.name for p in (out / "images").iterdir()) == [f"val_{i:05d}.png" for i in range(16)]
        outputs[weights.suffix] = rows
    pt, ox = outputs[".pt"], outputs[".onnx"]
    assert len(pt) == len(ox) > 0
    for a, b in zip(pt, ox):
        assert set(a) == {"image_id", "file_name", "category_id", "category_name", "bbox", "score"}
        assert (a["file_name"], a["category_id"], a["category_name"]) == (b["file_name"], b["category_id"],
                                                                          b["category_name"])
        assert a["category_name"] == names[a["category_id"]]
        np.testing.assert_allclose(a["bbox"], b["bbox"], atol=0.01)
        assert a["score"] == pytest.approx(b["score"], abs=1e-4)


def test_parity_check_catches_an_export_that_detects_less(exported, run_copy, tmp_path):
    """An ONNX file whose class scores are cut tenfold (a real graph edit) fails the comparison."""
    model = onnx.load(str(exported))
    graph = model.graph
    out_name = graph.output[0].name
    producer = next(n for n in graph.node if out_name in n.output)
    producer.output[list(producer.output).index(out_name)] = "untouched"
    rows = graph.output[0].type.tensor_type.shape.dim[1].dim_value
    factor = np.ones((1, rows, 1), np.float32)
    factor[0, 4:] = 0.1  # boxes kept, every class score divided by ten
    graph.initializer.append(onnx.numpy_helper.from_array(factor, "factor"))
    graph.node.append(onnx.helper.make_node("Mul", ["untouched", "factor"], [out_name]))
    tampered = tmp_path / "tampered.onnx"
    onnx.save(model, str(tampered))

    files = sources.resolve(val_images(run_copy))[:4]
    figures = export.compare(run_copy / "weights" / "best.pt", tampered, "onnx", 64, files,
                             [sources.read(f) for f in files], conf=0.001, iou_match=0.9)
    p = figures["parity"]
    assert p["passed"] is False and p["boxes_pt"] > 0 and p["boxes_export"] < p["boxes_pt"]
    assert "pt box" in p["unmatched"][0] and p["max_abs_diff_boxes_px"] < 1e-2 and p["max_abs_diff_scores"] > 1e-3


def test_matching_rules():
    raw = np.zeros((4 + 2, 3), np.float32)  # three anchors, two classes
    raw[:4] = np.array([[10, 10, 8, 8], [12, 10, 8, 8], [40, 40, 10, 10]], np.float32).T
    raw[4:] = np.array([[0.5, 0.1], [0.49, 0.1], [0.1, 0.3]], np.float32).T

    def box(i, cls):  # anchor i's box as one final detection of class cls
        xy, wh = raw[:2, i], raw[2:4, i]
        return np.array([[*(xy - wh / 2), *(xy + wh / 2), raw[4 + cls, i], cls]])

    same = parity.match_detections(box(0, 0), box(0, 0), raw, raw, conf=0.2)
    assert same.passed and same.boxes_compared == 2 and same.matched_final == 2
    # Moved by half its width: IoU 1/3, not the same box.
    moved = box(0, 0) + np.array([[4, 0, 4, 0, 0, 0]])
    assert not parity.match_detections(box(0, 0), moved, raw, raw, conf=0.2, iou_match=0.9).passed
    # NMS kept the neighbouring anchor on the other side: found among its candidates, still a pass.
    tie = parity.match_detections(box(0, 0), np.zeros((0, 6)), raw, raw, conf=0.2)
    assert tie.passed and tie.matched_candidates == 1
    # A different class at the same place is not the same detection.
    other = raw.copy()
    other[4:] = other[4:][::-1]
    wrong = parity.match_detections(box(2, 1), np.zeros((0, 6)), raw, other, conf=0.2)
    assert not wrong.passed and "class 1" in wrong.unmatched[0]


@pytest.mark.parametrize("case", ["no weights", "corrupt weights", "unknown format", "unreadable image",
                                  "empty folder", "missing backend"])
def test_bad_input_gives_one_clear_line(case, run_copy, exported, tmp_path):
    if case == "no weights":
        bare = tmp_path / "bare"
        shutil.copytree(run_copy, bare, ignore=shutil.ignore_patterns("*.pt", "*.onnx"))
        line = one_line_error(invoke("export", bare))
        assert "no weights/best.pt" in line
    elif case == "corrupt weights":
        bad = tmp_path / "best.pt"
        bad.write_bytes(b"\x80\x04not a checkpoint" * 100)
        assert "cannot load" in one_line_error(invoke("export", bad))
        assert "cannot load" in one_line_error(invoke("predict", bad, val_images(run_copy)))
    elif case == "unknown format":
        result = invoke("export", run_copy, "--format", "onyx")
        assert "unknown export format 'onyx'" in one_line_error(result) and result.exit_code == 2
    elif case == "unreadable image":
        (tmp_path / "imgs").mkdir()
        shutil.copy(sorted(val_images(run_copy).glob("*.png"))[0], tmp_path / "imgs" / "good.png")
        (tmp_path / "imgs" / "broken.jpg").write_bytes(b"\xff\xd8 truncated jpeg")
        line = one_line_error(invoke("predict", exported, tmp_path / "imgs", "--out", tmp_path / "out"))
        assert "cannot read image" in line and "broken.jpg" in line
        assert not (tmp_path / "out").exists()  # refused before writing anything
    elif case == "empty folder":
        (tmp_path / "empty").mkdir()
        assert "holds no images" in one_line_error(invoke("predict", exported, tmp_path / "empty"))
        assert "no images match" in one_line_error(invoke("predict", exported, str(tmp_path / "empty" / "*.jpg")))
    elif case == "missing backend":
        # openvino is an optional backend, not a dependency: expect the install hint
        import importlib.util

        if importlib.util.find_spec("openvino") is not None:
            pytest.skip("openvino is installed here")
        line = one_line_error(invoke("export", run_copy, "--format", "openvino", "--out", tmp_path / "ov"))
        assert "pip install 'openvino" in line and "never installed automatically" in line


def test_entry_point_predicts_offline(exported, run_copy, tmp_path):
    proc = run_cli(["predict", str(exported), str(val_images(run_copy)), "--out", str(tmp_path / "p"), "--conf",
                    "0.001", "--no-images"], tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert not (tmp_path / "netlog.txt").exists(), (tmp_path / "netlog.txt").read_text()
    assert json.loads((tmp_path / "p" / "predictions.json").read_text())
    assert not (tmp_path / "p" / "images").exists()
