"""The GPU memory model without a GPU: allocator rules, fake run = real run, physics, decisions, CLI.

The fake run is checked against a real CPU run of the same steps with the same
tracker (exact bytes); the caching allocator model against PyTorch's rules; the
decision per GPU size is batching.decide_gpu fed with predictions, as on CUDA.
"""

from __future__ import annotations

import json
import os
import sys

import pytest
from click.testing import CliRunner

from detector.cli import main
from detector.errors import UsageError
from detector.train import autobatch, batching, gpuplan
from detector.yolo.allocator import CachingAllocator, round_size, segment_size

MIB = 1 << 20


# -- the caching allocator model --------------------------------------------------------------------------------


@pytest.mark.parametrize("request_bytes, rounded, segment", [
    (1, 512, 2 * MIB), (512, 512, 2 * MIB), (513, 1024, 2 * MIB), (MIB, MIB, 2 * MIB),  # small pool
    (MIB + 1, MIB + 512, 20 * MIB), (10 * MIB - 512, 10 * MIB - 512, 20 * MIB),  # large pool, 20 MiB segments
    (10 * MIB, 10 * MIB, 10 * MIB), (11 * MIB, 11 * MIB, 12 * MIB),  # 10 MiB and up: rounded to 2 MiB
])
def test_allocator_sizes(request_bytes, rounded, segment):
    assert round_size(request_bytes) == rounded and segment_size(rounded) == segment


def test_allocator_best_fit_split_and_merge():
    a = CachingAllocator()
    a.malloc(1, 3 * MIB)  # a 20 MiB segment, split: 17 MiB stay cached
    a.malloc(2, 5 * MIB)  # served from the cached rest
    assert (a.reserved, a.allocated) == (20 * MIB, 8 * MIB)
    a.malloc(3, 12 * MIB)  # 12 MiB fit in the 12 MiB left: no new segment
    assert a.reserved == 20 * MIB
    a.free(1), a.free(2)  # neighbours merge into one 8 MiB free block
    a.malloc(4, 8 * MIB)
    assert a.reserved == 20 * MIB
    a.malloc(5, 1000)  # small requests never take large-pool blocks
    assert a.reserved == 22 * MIB and a.peak_reserved == 22 * MIB
    a.free(3), a.free(4), a.free(5)
    assert a.allocated == 0 and a.reserved == 22 * MIB  # segments stay cached
    a.reset_peak()
    assert a.peak_allocated == 0 and a.peak_reserved == 22 * MIB


def test_empty_cache_returns_only_free_segments():
    a = CachingAllocator()
    a.malloc(1, 3 * MIB), a.malloc(2, 12 * MIB), a.malloc(3, 1000)
    a.free(2), a.free(3)
    a.empty_cache()  # the 20 MiB segment still holds allocation 1; the small segment is empty
    assert a.reserved == 20 * MIB
    a.free(1)
    a.empty_cache()
    assert a.reserved == 0 and a.allocated == 0


@pytest.mark.parametrize("version, end, before, unit", [
    ("8.0.20", None, None, 1e9), ("8.0.196", 0.0, None, 1e9), ("8.3.75", 0.0, None, 1e9), ("8.3.86", 0.0, None, 2**30),
    ("8.3.87", 0.9, None, 2**30), ("8.3.108", 0.9, None, 2**30), ("8.3.109", 0.5, None, 2**30),
    ("8.3.151", 0.5, None, 2**30), ("8.3.152", 0.5, 0.5, 2**30), ("", 0.5, 0.5, 2**30),
])
def test_version_rules(version, end, before, unit):
    """The boundaries are the releases whose trainer.py changed (bisected in the wheels on PyPI)."""
    from detector.yolo import memcauses

    rule = memcauses.cache_rule(version)
    assert (rule.at_epoch_end, rule.before_validation) == (end, before) and memcauses.gpu_mem_unit(version) == unit


def test_cache_rules_on_an_allocator():
    from detector.yolo import memcauses

    def reserved_after(rule, total, before_validation=False):
        a = CachingAllocator()
        a.malloc(1, 30 * MIB)
        a.free(1)  # 30 MiB cached, nothing in use
        memcauses.empty_cache_if(a, rule, total, before_validation)
        return a.reserved

    assert reserved_after(memcauses.NEVER, 40 * MIB) == 30 * MIB
    assert reserved_after(memcauses.ALWAYS, None) == 0  # unconditional: no GPU size needed
    ninety, half = memcauses.cache_rule("8.3.90"), memcauses.cache_rule("8.4.0")
    assert reserved_after(ninety, 40 * MIB) == 30 * MIB and reserved_after(ninety, 32 * MIB) == 0  # 75%, 94%
    assert reserved_after(half, 40 * MIB) == 0 and reserved_after(half, 40 * MIB, before_validation=True) == 0
    assert reserved_after(ninety, 32 * MIB, before_validation=True) == 30 * MIB  # 8.3.87-8.3.151: at the end only
    assert reserved_after(half, None) == 30 * MIB  # a share of an unknown GPU: kept, the larger figure


def test_box_load_from_real_counts():
    counts = {"train": [0, 1, 2, 3, 50] * 20, "val": [1, 7, 2]}
    load = autobatch.box_load(counts, {})
    assert load["val"] == load["val_high"] == 7
    assert load["train_high"] == 200  # the four densest images in one mosaic
    assert 4 <= load["train"] <= load["train_high"]
    assert autobatch.box_load(counts, {"mosaic": 0})["train_high"] == 50


# -- the fake run against a real CPU run ------------------------------------------------------------------------


def _images(folder, sizes, rotated=()):
    """JPEGs of these (width, height) with one box each; those in `rotated` carry EXIF orientation 6 (turned 90)."""
    from PIL import Image

    (folder / "images").mkdir(parents=True)
    (folder / "labels").mkdir()
    for i, (w, h) in enumerate(sizes):
        exif = Image.Exif()
        if i in rotated:
            exif[0x0112] = 6
        Image.new("RGB", (w, h), (i * 7 % 255, 90, 160)).save(folder / "images" / f"{i:03d}.jpg", exif=exif)
        (folder / "labels" / f"{i:03d}.txt").write_text("0 0.5 0.5 0.2 0.2\n")
    return sorted((folder / "images").glob("*.jpg"))


def test_val_batch_shapes_are_ultralytics_own(tmp_path, coco128_yaml):
    """Validation's rectangular batches as Ultralytics' dataset forms them: COCO's mixed shapes, 16:9, portrait, EXIF."""
    import shutil

    import detector.yolo  # noqa: F401  (hermetic Ultralytics)
    from ultralytics.data.dataset import YOLODataset

    from detector import facts
    from detector.data import datasets

    coco = tmp_path / "coco"
    shutil.copytree(coco128_yaml.parent / "images" / "train2017", coco / "images")
    shutil.copytree(coco128_yaml.parent / "labels" / "train2017", coco / "labels")
    mixed = _images(tmp_path / "mixed", [(64, 36)] * 5 + [(36, 48)] * 4 + [(50, 50)] * 2 + [(64, 36)] * 2,
                    rotated=(11, 12))
    cases = [(coco, sorted((coco / "images").glob("*.jpg")), 640, (8, 32)), (tmp_path / "mixed", mixed, 640, (2, 4)),
             (tmp_path / "mixed", mixed, 800, (3,))]
    for folder, files, imgsz, batches in cases:
        aspects = datasets.image_aspects(files)
        assert len(aspects) == len(files)
        for b in batches:
            ds = YOLODataset(img_path=str(folder / "images"), imgsz=imgsz, batch_size=b, rect=True, pad=0.5, stride=32,
                             augment=False, data={"names": {i: str(i) for i in range(80)}, "nc": 80, "channels": 3})
            want = [tuple(int(x) for x in shape) for shape in ds.batch_shapes]
            assert facts.val_batch_shapes(imgsz, aspects, b) == want, (folder.name, imgsz, b)
            assert facts.val_batch_shape(imgsz, aspects, b) == max(want, key=lambda s: s[0] * s[1])
    assert datasets.image_aspects(mixed)[11] == pytest.approx(64 / 36)  # EXIF-turned: taller than wide
    assert facts.val_batch_shape(640) == (672, 672)  # square images: half a stride of padding on each side's count
    assert facts.val_batch_shape(640, [9 / 16] * 10, 10) == (384, 672)


@pytest.mark.parametrize("version", ["", "8.0.20", "8.0.60", "8.3.40"])  # the assigner of each era
def test_fake_peak_equals_real_cpu_run(version):
    """Same steps, same tracker: the fake run's trace is byte for byte the real CPU run's."""
    import torch

    from detector.yolo import fakerun
    from detector.yolo.tracking import RecordingPlanner, ReplayPlanner

    torch.manual_seed(0)
    model = fakerun.build_model("yolo11n.yaml", 3)
    spec = fakerun.StepSpec(batch=2, imgsz=64, boxes=3, val_boxes=2, amp="off", ultralytics=version)
    recorded = RecordingPlanner()
    real = fakerun.run(model, spec, recorded, fake=False)
    fake = fakerun.run(model, spec, ReplayPlanner(recorded.answers), fake=True)
    assert [e[0] for e in fake.events] == [e[0] for e in real.events]
    assert _peak(fake.events) == _peak(real.events) > 0
    assert len(fake.grads) == len(real.grads) and len(fake.state) == len(real.state) > 0


@pytest.mark.parametrize("version, era", [
    ("8.0.20", "8.0-full-ciou"), ("8.0.51", "8.0-full-ciou"), ("8.0.52", "8.0-one-hot"), ("8.0.95", "8.0-one-hot"),
    ("8.0.96", "8.0-repeat"), ("8.0.106", "8.0-repeat"), ("8.0.107", "float-masks"), ("8.3.89", "float-masks"),
    ("8.4.90", "float-masks"), ("8.4.91", "current"), ("", "current")])
def test_assigner_era_by_release(version, era):
    from detector.yolo import assigners

    assert assigners.era(version) == era


def test_older_assigners_cost_more_on_dense_images():
    """Each older era's tensors come on top of the installed assigner's: more boxes, more bytes, 8.0.20 most."""
    from detector.yolo import memory

    def loss_gib(version, boxes):
        mm = memory.MemoryModel(memory.MemorySettings(model="yolo11n.yaml", nc=3, imgsz=320, train_boxes=boxes,
                                                      val_boxes=2, ultralytics=version))
        return _peak(mm.trace(4, boxes, 2).events) / 2**30

    now, mid, old = (loss_gib(v, 60) for v in ("", "8.3.40", "8.0.20"))
    assert now < mid < old
    assert loss_gib("8.0.20", 10) < old


def test_forked_pair_matches_sequential_calls():
    from detector.yolo import forked

    def work(n, tag):
        if tag == "fail-in-child" and os.getpid() != parent:
            raise RuntimeError("child only")
        return [tag] * n, os.getpid()

    parent = os.getpid()
    (a, pid_a), (b, pid_b) = forked.both(work, (2, "x"), (3, "y"))
    assert a == ["x", "x"] and b == ["y"] * 3 and pid_a == parent
    assert pid_b != parent or not sys.platform.startswith("linux")  # computed in the child where fork is used
    _, (c, pid_c) = forked.both(work, (1, "x"), (2, "fail-in-child"))  # a failing child: redone here
    assert c == ["fail-in-child"] * 2 and pid_c == parent


def test_forked_child_that_hangs_is_stopped_and_the_call_redone(monkeypatch):
    import time

    from detector.yolo import forked

    parent = os.getpid()

    def work(tag):
        if tag == "hang" and os.getpid() != parent:
            time.sleep(3600)
        return tag, os.getpid()

    real_collect = forked._collect
    monkeypatch.setattr(forked, "_collect", lambda read, pid, deadline: real_collect(read, pid, time.monotonic() + 1))
    started = time.monotonic()
    _, (b, pid_b) = forked.both(work, ("x",), ("hang",))
    assert b == "hang" and pid_b == parent and time.monotonic() - started < 30


def test_rescaled_trace_equals_a_direct_trace():
    """Two reference traces rescaled to another batch and box count give the direct trace's sizes."""
    from detector.yolo import memory

    mm = memory.MemoryModel(memory.MemorySettings(model="yolo11n.yaml", nc=3, imgsz=160, train_boxes=5, val_boxes=2))
    direct = mm.trace(6, 8, 3)  # boxes x anchors below the anchor count: no clipped count
    scaled = mm.family().events(6, 8, 3)
    a, b = [e[0] for e in direct.events], [e[0] for e in scaled]
    assert len(a) == len(b)
    # Small index tensors round to 512 bytes differently; at 160 px they are a visible share, at 640 px 0.01%.
    assert sum(x for x in b if x > 0) == pytest.approx(sum(x for x in a if x > 0), rel=0.01)
    assert _peak(scaled) == pytest.approx(_peak(direct.events), rel=0.01)


def _peak(events) -> int:
    live = peak = 0
    for nbytes, _, _ in events:
        live += nbytes
        peak = max(peak, live)
    return peak


# -- physics ----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def predictions():
    """yolo11n at 160 px: batch 4/8/16 with AMP and AdamW, 8 without AMP and with SGD, 8 at 224 px."""
    from detector.yolo import memory

    def model(**kw):
        return memory.MemoryModel(memory.MemorySettings(model="yolo11n.yaml", nc=3, train_boxes=4, **kw))

    amp = model(imgsz=160)
    out = {"amp": {b: amp.predict(b) for b in (4, 8, 16)}, "224": model(imgsz=224).predict(8),
           "fp32": model(imgsz=160, amp="off", optimizer="SGD").predict(8)}
    amp.settings = memory.MemorySettings(model="yolo11n.yaml", nc=3, train_boxes=4, imgsz=160, val_aspects=(9 / 16,))
    out["16:9"] = amp.predict(8)
    return out


def test_memory_grows_with_batch_and_imgsz(predictions):
    p = predictions["amp"]
    assert p[4].train_gb < p[8].train_gb < p[16].train_gb
    assert p[4].val_gb < p[8].val_gb < p[16].val_gb
    assert p[4].peak_gb <= p[8].peak_gb <= p[16].peak_gb
    assert predictions["224"].train_allocated_gb > p[8].train_allocated_gb


def test_amp_below_fp32_and_sgd_state_half_of_adamw(predictions):
    amp, fp32 = predictions["amp"][8], predictions["fp32"]
    assert amp.train_allocated_gb < fp32.train_allocated_gb
    assert amp.breakdown["activations"] < fp32.breakdown["activations"]
    assert fp32.breakdown["optimizer_state"] == pytest.approx(amp.breakdown["optimizer_state"] / 2, rel=0.05)


def test_validation_of_wide_images_takes_less(predictions):
    """16:9 images validate at 128 x 192 at 160 px, square ones at 192 x 192: validation takes less, training the same."""
    square, wide = predictions["amp"][8], predictions["16:9"]
    assert wide.train_gb == square.train_gb and wide.train_allocated_gb == square.train_allocated_gb
    assert wide.val_allocated_gb < square.val_allocated_gb
    assert wide.val_gb_high <= square.val_gb_high


def test_breakdown_adds_up(predictions):
    p = predictions["amp"][8]
    b = p.breakdown
    parts = sum(v for k, v in b.items() if k != "allocator_overhead")
    assert parts == pytest.approx(p.train_allocated_gb, rel=0.02)  # blocks too small to split add a little
    assert b["weights"] == pytest.approx(2 * b["gradients"], rel=0.05)  # model and EMA weights; one gradient each
    assert b["optimizer_state"] == pytest.approx(2 * b["gradients"], rel=0.05)  # AdamW: two moments
    assert b["allocator_overhead"] >= 0


# -- the decision per GPU size ----------------------------------------------------------------------------------


def _pred(batch, train, val):
    from detector.yolo.memory import MemoryPrediction

    return MemoryPrediction(batch, train, val, train * 0.8, val * 0.5)


PREDICTED = [_pred(16, 3.0, 3.4), _pred(32, 5.8, 6.5), _pred(64, 11.4, 12.8)]


@pytest.mark.parametrize("size, chosen", [
    (4, None), (6, 16), (8, 16), (10, 32), (12, 32), (16, 64), (24, 64), (80, 64),
])
def test_choice_per_gpu_size(size, chosen):
    """decide_gpu fed with predictions plus the CUDA context: the batch --batch auto would take on that GPU."""
    d = gpuplan.decide_for_size(PREDICTED, size, 0.85, (16, 32, 64), 1000, 64, 640)
    assert (d.chosen if isinstance(d, batching.BatchDecision) else None) == chosen
    if chosen is None:
        assert "no batch size fits" in d
    else:
        assert "predicted peak" in d.reason


def test_probe_skips_what_the_model_puts_far_over_budget():
    predicted = {16: 3.4, 32: 6.5, 64: 12.8}
    assert autobatch.skip_by_prediction(predicted, 10.0) == set()
    assert autobatch.skip_by_prediction(predicted, 8.0) == {64}
    assert autobatch.skip_by_prediction(predicted, 4.0) == {32, 64}
    measured = [batching.Measurement(16, 3.2, 3.5)]
    d = batching.decide_gpu(measured, 8.0, 0.85, (16, 32, 64), 100)
    d = autobatch.with_predictions(d, predicted, {32, 64})
    rows = {r.batch: r for r in d.table}
    assert rows[16].predicted_peak_gb == 3.4 and rows[16].peak_gb == 3.5 and d.chosen == 16
    assert "not probed: predicted 6.50 GB" in rows[32].note
    assert d.summary()["table"][0]["predicted_peak_gb"] == 3.4  # recorded in run.json beside the measurement
    text = batching.table_text(d)
    assert "predicted GB" in text.splitlines()[0] and "3.40" in text.splitlines()[1]


# -- the command ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("args, text", [
    (["--gpu-memory", "0"], "--gpu-memory takes GPU memory sizes"),
    (["--gpu-memory", "-8"], "--gpu-memory takes GPU memory sizes"),
    (["--gpu-memory", "abc"], "--gpu-memory takes GPU memory sizes"),
    (["--gpu-memory", "8,,16"], "--gpu-memory takes GPU memory sizes"),
    (["--gpu-memory", "8", "--boxes-per-image", "-1"], "--boxes-per-image must be at least 1"),
    (["--gpu-memory", "8", "--classes", "0"], "--classes must be at least 1"),
    (["--gpu-memory", "8", "--classes", "3", "--boxes-per-image", "4", "--model", "nosuch.yaml"], "unknown model"),
    (["--gpu-memory", "8", "--classes", "3", "--boxes-per-image", "4", "amp=maybe"], "amp must be"),
    (["--gpu-memory", "8", "--classes", "3", "--boxes-per-image", "4", "optimizer=Lion"], "optimizer must be"),
    (["--gpu-memory", "8", "--classes", "3", "--boxes-per-image", "4", "mosaic=abc"], "'mosaic=abc' is of invalid type"),
    (["--json"], "go with --gpu-memory"),
])
def test_bad_input_is_one_line_and_nonzero(args, text):
    result = CliRunner().invoke(main, ["batch", *args])
    assert result.exit_code != 0
    lines = [x for x in result.output.strip().splitlines() if x.strip()]
    assert len(lines) == 1 and text in lines[0], result.output


def test_gpu_sizes_parse():
    assert gpuplan.parse_gpu_sizes("24,8, 16GB") == (8.0, 16.0, 24.0)
    with pytest.raises(UsageError):
        gpuplan.parse_gpu_sizes("inf")


def test_plan_without_a_dataset_uses_ultralytics_defaults():
    """--classes and --boxes-per-image plan for the user's own data: mosaic on (x4 boxes), nbs 64, imgsz 640."""
    result = CliRunner().invoke(main, ["batch", "--gpu-memory", "24", "--classes", "3", "--boxes-per-image", "10",
                                       "--batch-candidates", "16", "--json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.output)
    assert doc["settings"]["imgsz"] == 640 and doc["settings"]["train_boxes_per_image"] == 40
    assert doc["settings"]["densest_image_boxes"] == 10 and doc["settings"]["box_statistics"] == "densest"
    assert doc["settings"]["val_shapes"] == "square" and doc["settings"]["val_batch_shape"] == [672, 672]


def test_batch_gpu_memory_json_end_to_end(tiny_data):
    """The command on a real dataset: predictions per candidate, fits per size, the choice per size."""
    result = CliRunner().invoke(main, ["batch", "--data", str(tiny_data), "--imgsz", "64", "--batch-candidates", "8,16",
                                       "--gpu-memory", "0.55,80", "--json", "mosaic=0"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.output)
    assert [c["batch"] for c in doc["candidates"]] == [8, 16]
    for c in doc["candidates"]:
        assert 0 < c["predicted_train_gb"] <= c["predicted_peak_gb"]
        assert c["predicted_peak_gb"] == max(c["predicted_train_gb"], c["predicted_val_gb"])
        assert c["predicted_train_gb_high"] >= c["predicted_train_gb"]
        assert c["predicted_peak_gb_high"] >= c["predicted_peak_gb"]
        assert c["predicted_peak_gb_high"] == max(c["predicted_train_gb_high"], c["predicted_val_gb_high"])
        # the causes the text lists add up to the gap between the typical and the worst peak
        gap = c["predicted_peak_gb_high"] - c["predicted_peak_gb"]
        assert sum(c["high_causes_gb"].values()) == pytest.approx(gap, abs=0.005) and gap > 0
        assert c["fits"] == {"0.55": False, "80": True}
    assert doc["context_gb"] > 0
    assert doc["chosen"] == {"0.55": None, "80": 16}
    assert doc["settings"]["amp"] == "on" and doc["settings"]["optimizer"] == "AdamW"
    assert doc["settings"]["box_statistics"] == "dataset"
    from detector import facts
    from detector.data import datasets

    aspects = datasets.image_aspects(sorted((tiny_data.parent / "images" / "val").glob("*")))
    assert len(aspects) == 16 and doc["settings"]["val_shapes"] == "dataset"
    assert doc["settings"]["val_batch_shape"] == list(facts.val_batch_shape(64, aspects, 32))
