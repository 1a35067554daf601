"""detector's fast training loader against Ultralytics' own, at equal augmentation.

Both loaders are drawn over the same seeds and the same sample order. The fast one
draws its random numbers exactly as Ultralytics' pipeline does, so the layouts,
matrices, flips and HSV gains are the same, and the box statistics agree exactly
over these seeds (measured: every sample has the same boxes). Their tolerances
(2% relative, 1 point of share) only leave room for a box at the 2-px or 10%-area
threshold flipping under float rounding. Pixels differ by resampling alone: tiles
are resized into place rather than a canvas warped (under half a source pixel
apart), and coco128's 640-px photos are decoded at 1/4 scale for imgsz 128, which
averages where Ultralytics' 5x INTER_LINEAR shrink skips pixels (aliasing). That
lowers the per-channel spread by 1.3-2.4% and moves the mean by at most 0.26 of
255 (docs/benchmarks.md, "Equal work"); the tolerances are 5% and 1.0.
"""

from __future__ import annotations

import numpy as np
import pytest
import yaml

from detector.errors import UsageError

SAMPLES = {"mosaic": 300, "single": 150, "rotated": 100}
CASES = {  # name: Ultralytics overrides
    "mosaic": {"mosaic": 1.0},
    "single": {"mosaic": 0.0},  # mosaic=0 and the last close_mosaic epochs
    "rotated": {"mosaic": 1.0, "degrees": 10.0, "shear": 2.0},  # not axis-aligned: the canvas fallback
}
IMGSZ = 128  # small for speed; coco128's 640-px photos then also take the reduced-scale JPEG decode


@pytest.fixture(scope="module")
def coco_mirror(tmp_path_factory, coco128_yaml):
    """coco128 through per-file symlinks, so Ultralytics' label cache is written here, never beside the dataset."""
    src = coco128_yaml.parent
    root = tmp_path_factory.mktemp("coco-mirror")
    for kind in ("images", "labels"):
        (root / kind / "train2017").mkdir(parents=True)
        for f in (src / kind / "train2017").iterdir():
            (root / kind / "train2017" / f.name).symlink_to(f)
    spec = yaml.safe_load(coco128_yaml.read_text())
    out = root / "data.yaml"
    out.write_text(yaml.safe_dump({**spec, "path": str(root)}))
    return out


def draw(data_yaml, loader: str, overrides: dict, n: int, seed: int = 0) -> list[dict]:
    """n augmented samples from one loader, seeded as training seeds it, in a fixed order of indexes."""
    from detector.yolo import loader as yolo_loader

    dataset, _, _ = yolo_loader.training_loader(data_yaml, None, IMGSZ, 16, seed=seed, overrides=overrides,
                                                loader=loader)
    # its own generator: the global ones belong to the loader
    order = np.random.default_rng(seed).integers(0, len(dataset), n)
    return [dataset[int(i)] for i in order]


def stats(samples: list[dict]) -> dict:
    """What training sees: boxes per image, box size and aspect, share clipped at the border, pixel mean/spread."""
    counts = np.array([len(s["bboxes"]) for s in samples])
    xywh = np.concatenate([s["bboxes"].numpy() for s in samples]) * IMGSZ
    w, h = xywh[:, 2], xywh[:, 3]
    x1, y1, x2, y2 = xywh[:, 0] - w / 2, xywh[:, 1] - h / 2, xywh[:, 0] + w / 2, xywh[:, 1] + h / 2
    clipped = (x1 < 0.01) | (y1 < 0.01) | (x2 > IMGSZ - 0.01) | (y2 > IMGSZ - 0.01)
    pixels = np.stack([s["img"].numpy().reshape(3, -1).astype(np.float32) for s in samples], 1).reshape(3, -1)
    q = (10, 50, 90)
    return {"boxes_per_image": counts.mean(), "empty_images": (counts == 0).mean(), "clipped": clipped.mean(),
            "width": np.percentile(w, q), "height": np.percentile(h, q),
            "aspect": np.percentile(np.maximum(w / h, h / w), q),
            "mean": pixels.mean(1), "std": pixels.std(1)}


@pytest.fixture(scope="module", params=list(CASES))
def both(request, coco_mirror):
    name = request.param
    drawn = {loader: draw(coco_mirror, loader, CASES[name], SAMPLES[name]) for loader in ("ultralytics", "fast")}
    return name, drawn, {loader: stats(samples) for loader, samples in drawn.items()}


def test_equal_work_box_statistics(both):
    name, _, measured = both
    stock, fast = measured["ultralytics"], measured["fast"]
    assert fast["boxes_per_image"] == pytest.approx(stock["boxes_per_image"], rel=0.02), name
    assert abs(fast["empty_images"] - stock["empty_images"]) <= 0.01, name
    assert abs(fast["clipped"] - stock["clipped"]) <= 0.01, name
    for key in ("width", "height", "aspect"):
        assert fast[key] == pytest.approx(stock[key], rel=0.02), (name, key)


def test_equal_work_pixel_statistics(both):
    name, _, measured = both
    stock, fast = measured["ultralytics"], measured["fast"]
    assert np.abs(fast["mean"] - stock["mean"]).max() <= 1.0, (name, fast["mean"], stock["mean"])  # of 255
    assert fast["std"] == pytest.approx(stock["std"], rel=0.05), (name, fast["std"], stock["std"])


def test_same_seed_gives_the_same_samples(both):
    """The draws match one for one: same source images, same boxes, same classes, nearly the same pixels."""
    name, drawn, _ = both
    same = 0
    for a, b in zip(drawn["ultralytics"], drawn["fast"]):
        assert a["im_file"] == b["im_file"] and a["img"].shape == b["img"].shape
        if a["bboxes"].shape == b["bboxes"].shape and np.allclose(a["bboxes"], b["bboxes"], atol=1e-4) \
                and np.array_equal(a["cls"], b["cls"]):
            same += 1
    assert same >= 0.98 * len(drawn["fast"]), f"{name}: {same} of {len(drawn['fast'])} samples alike"
    diff = np.mean([np.abs(a["img"].numpy().astype(np.float32) - b["img"].numpy()).mean()
                    for a, b in zip(drawn["ultralytics"], drawn["fast"])])
    assert diff < 12, f"{name}: mean absolute pixel difference {diff:.1f}"  # of 255; measured 5.6-7.6


def test_reduced_decode_matches_the_full_decode(coco_mirror):
    import cv2

    from detector.yolo import loader as yolo_loader

    fast, _, _ = yolo_loader.training_loader(coco_mirror, None, IMGSZ, 16, loader="fast")
    stock, _, _ = yolo_loader.training_loader(coco_mirror, None, IMGSZ, 16, loader="ultralytics")
    off = {"ultralytics": 0.0, "fast": 0.0}
    for i in range(12):
        a, hw0_a, hw_a = stock.load_image(i)
        b, hw0_b, hw_b = fast.load_image(i)
        assert (hw0_a, hw_a) == (hw0_b, hw_b)
        assert np.abs(a.reshape(-1, 3).mean(0) - b.reshape(-1, 3).mean(0)).max() < 1.5  # same colours
        area = cv2.resize(cv2.imread(stock.im_files[i]), hw_a[::-1], interpolation=cv2.INTER_AREA).astype(np.float32)
        off["ultralytics"] += np.abs(area - a).mean()
        off["fast"] += np.abs(area - b).mean()
    # the DCT-domain 1/4 decode averages where INTER_LINEAR's 5x shrink skips pixels: nearer the area average
    assert off["fast"] < off["ultralytics"], off


def test_validation_and_unsupported_settings_stay_stock(coco_mirror):
    from ultralytics.cfg import DEFAULT_CFG, get_cfg
    from ultralytics.data.utils import check_det_dataset

    from detector.yolo import fastload

    data = check_det_dataset(str(coco_mirror))
    cfg = get_cfg(DEFAULT_CFG, {"imgsz": IMGSZ, "data": str(coco_mirror)})
    val = fastload.build_dataset(cfg, data["val"], 16, data, mode="val", rect=True)
    assert type(val).__name__ == "YOLODataset"  # letterbox, rectangular batches
    mixup = fastload.build_dataset(get_cfg(DEFAULT_CFG, {"imgsz": IMGSZ, "mixup": 0.5}), data["train"], 16, data)
    assert mixup.fast is False and type(mixup.transforms).__name__ == "Compose"  # Ultralytics' own pipeline


def test_loader_key_is_detectors_own():
    from detector.yolo import checks

    checks.check_overrides({"loader": "ultralytics", "mosaic": 0.5})
    assert checks.training_loader({}) == "fast" and checks.training_loader({"loader": "ultralytics"}) == "ultralytics"
    with pytest.raises(UsageError, match="loader=fast"):
        checks.check_overrides({"loader": "turbo"})


def test_preview_draws_the_same_batch_with_either_loader(tiny_data, tmp_path):
    from detector.data import datasets
    from detector.yolo import loader as yolo_loader

    data_yaml = datasets.load(tiny_data).write_resolved(tmp_path / "d.yaml")
    fast = yolo_loader.augmented_batch(data_yaml, None, 64, 8, seed=1)
    stock = yolo_loader.augmented_batch(data_yaml, None, 64, 8, seed=1, overrides={"loader": "ultralytics"})
    assert fast["files"] == stock["files"] and np.array_equal(fast["cls"], stock["cls"])
    assert np.allclose(fast["bboxes"], stock["bboxes"], atol=1e-4)
    assert np.abs(fast["images"].astype(float) - stock["images"]).mean() < 8


@pytest.mark.parametrize("loader", ["fast", "ultralytics"])
def test_training_records_the_loader_it_ran(tiny_data, tmp_path, loader):
    import json

    from click.testing import CliRunner

    from detector.cli import main

    args = ["train", "--data", str(tiny_data), "--epochs", "1", "--imgsz", "64", "--batch", "16",
            "--project", str(tmp_path), "--name", "run", "plots=False", "val=False"]
    result = CliRunner().invoke(main, args + ([] if loader == "fast" else ["loader=ultralytics"]))
    assert result.exit_code == 0, result.output + repr(result.exception)
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert run["status"] == "completed" and run["loader"] == loader
    # the wait for data: per iteration in iterations.csv, summed in run.json, shown beside the step in the report
    import csv

    rows = list(csv.DictReader((tmp_path / "run" / "iterations.csv").open()))
    waited = sum(float(r["data_time_s"]) for r in rows)
    spent = sum(float(r["iter_time_s"]) for r in rows)
    assert run["data_wait"]["seconds"] == pytest.approx(waited, abs=0.01)
    assert run["data_wait"]["share"] == pytest.approx(waited / spent, abs=0.01) and 0 < run["data_wait"]["share"] < 1
    if loader == "fast":
        result = CliRunner().invoke(main, ["compare", str(tmp_path / "run"), "--out", str(tmp_path / "report")])
        assert result.exit_code == 0, result.output + repr(result.exception)
        assert "waiting for the next batch" in (tmp_path / "report" / "report.md").read_text()


def test_workers_follow_the_cores_unless_set(monkeypatch):
    from detector.yolo import fastload

    monkeypatch.setattr(fastload, "usable_cores", lambda: 2)
    assert fastload.choose_workers(8, ["detector", "train"]) == 2  # the default: one per usable core
    assert fastload.choose_workers(8, ["detector", "train", "--workers", "8"]) == 8  # asked for
    assert fastload.choose_workers(8, ["train", "--workers=8"]) == 8
    assert fastload.choose_workers(3, []) == 3  # not the default: set through the Python API
    monkeypatch.setattr(fastload, "usable_cores", lambda: 64)
    assert fastload.choose_workers(8, []) == fastload.MAX_WORKERS


def test_worker_batches_have_stock_keys_and_shapes(tiny_data, tmp_path):
    """With workers the images are stacked into shared memory; the batch must look as Ultralytics' does."""
    from detector.data import datasets
    from detector.yolo import loader as yolo_loader

    data_yaml = datasets.load(tiny_data).write_resolved(tmp_path / "d.yaml")
    batches = {}
    for loader in ("fast", "ultralytics"):
        _, batches_of, _ = yolo_loader.training_loader(data_yaml, None, 64, 8, workers=1, loader=loader)
        batches[loader] = next(iter(batches_of))
    fast, stock = batches["fast"], batches["ultralytics"]
    assert sorted(fast) == sorted(stock)
    assert fast["img"].shape == stock["img"].shape == (8, 3, 64, 64) and fast["img"].dtype == stock["img"].dtype
    assert fast["bboxes"].shape[1] == 4 and len(fast["batch_idx"]) == len(fast["cls"]) == len(fast["bboxes"])


def test_pixel_step_draws_exactly_as_albumentations_compose():
    """The fast path for pixel-only pipelines gives the step's own results, image for image, from the same seeds."""
    import random

    import torch

    from detector.yolo.fastload.pipeline import FastTrainPipeline  # first: it sets the offline environment

    import albumentations as A  # noqa: I001
    from ultralytics.data.augment import Albumentations

    def step():
        return Albumentations(p=1.0, transforms=[A.ToGray(p=0.3), A.Blur(p=0.3), A.RandomBrightnessContrast(p=0.3),
                                                 A.CLAHE(p=0.2)])

    stock, ours = step(), step()
    pipe = object.__new__(FastTrainPipeline)  # only its Albumentations fast path is exercised
    pipe._flat = None
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (48, 48, 3), np.uint8) for _ in range(60)]
    random.seed(0)
    torch.manual_seed(0)
    expected = [stock({"img": im.copy()})["img"] for im in images]
    random.seed(0)
    got = [pipe._pixel_step(ours, im.copy()) for im in images]
    assert pipe._flat is True
    assert all(np.array_equal(a, b) for a, b in zip(expected, got))
    changed = sum(not np.array_equal(a, im) for a, im in zip(expected, images))
    assert 10 < changed < 50  # some transforms fired, some samples passed through


def test_ram_cache_holds_the_images_load_image_decodes(coco_mirror):
    from detector.yolo import loader as yolo_loader
    from detector.yolo.fastload.cache import DecodedCache

    fast, _, _ = yolo_loader.training_loader(coco_mirror, None, IMGSZ, 16, loader="fast")
    assert fast.decoded is not None and fast.decoded.ready.all()
    for i in range(8):
        cached = fast.decoded.get(i)
        assert not cached.flags.writeable
        fast.decoded.ready[i] = False  # the decode path, as for an image past the cap
        fast.ims[i] = None
        decoded, hw0, hw = fast.load_image(i)
        fast.decoded.ready[i] = True
        assert np.array_equal(cached, decoded) and hw == cached.shape[:2] and hw0 == tuple(fast.labels[i]["shape"])
    shapes = [(480, 640), (640, 640), (100, 100)]
    capped = DecodedCache(shapes, 320, cap=240 * 320 * 3 + 100)  # room for the first image only
    assert capped.offsets == [0, None, None] and capped.nbytes == 240 * 320 * 3


def test_batches_are_written_in_place_and_match_single_samples(coco_mirror):
    """__getitems__ writes each image into its row of one batch tensor, which the collate hands on without a copy."""
    import random

    import torch

    from detector.yolo import loader as yolo_loader

    # mosaic off: its other tiles come from the buffer of recent images, which the first pass changes
    fast, _, _ = yolo_loader.training_loader(coco_mirror, None, IMGSZ, 16, loader="fast", overrides={"mosaic": 0.0})
    idx = list(range(5))
    state = (random.getstate(), np.random.get_state())
    together = fast.__getitems__(idx)
    random.setstate(state[0])
    np.random.set_state(state[1])
    alone = [fast[i] for i in idx]
    first = together[0]["img"].data_ptr()
    batch = fast.collate_fn(together)
    assert batch["img"].shape == (5, 3, IMGSZ, IMGSZ) and batch["img"].dtype == torch.uint8
    assert batch["img"].data_ptr() == first  # the batch the samples were written into, not a copy
    for k, sample in enumerate(alone):
        assert torch.equal(batch["img"][k], sample["img"])
    assert torch.equal(batch["bboxes"], torch.cat([s["bboxes"] for s in alone]))
