"""Export a trained detector for inference and prove the export detects what the .pt detects.

`run(ExportConfig)` is what `detector export` calls: resolve the weights (a run
folder's best.pt or a .pt file), export with Ultralytics on the CPU, then run the
same images from the run's val set through both models and compare (see
detector.deploy.parity). It writes export.json beside the exported file with the
figures, and raises ExportError when the detections differ, so a bad export
never passes unnoticed.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import statistics
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from detector import fileio, paths
from detector.deploy import parity
from detector.data import sources
from detector.errors import DetectorError, DiskFull, ExportError, ModelError, RunDirError, UsageError

log = logging.getLogger(__name__)


# Largest raw class-score difference accepted (scores are 0..1). float32 exports differ by about 1e-7 and
# FP16 ones by about 1e-5; a difference this large means the export computes something else.
SCORE_TOLERANCE = 0.01
EXPORT_JSON = "export.json"


@dataclass(frozen=True)
class ExportConfig:
    """Every option of one export, resolved by the CLI."""

    source: Path  # a run folder (its weights/best.pt) or a .pt file
    format: str = "onnx"
    imgsz: int | None = None  # None: the training image size
    half: bool = False
    dynamic: bool = False
    simplify: bool = True
    opset: int | None = None
    out: Path | None = None  # None: beside the .pt
    images: str | None = None  # parity images; None: the run's val set
    parity_images: int = 8
    conf: float = 0.001  # low, so an early model still has boxes to compare
    iou_match: float = 0.9


def resolve_weights(source: Path) -> tuple[Path, Path | None]:
    """The .pt to export and the run folder it belongs to (None for a loose .pt)."""
    source = Path(source).expanduser()
    if source.is_dir():
        best = source / "weights" / "best.pt"
        if not best.is_file():
            raise RunDirError(f"run folder {source} has no weights/best.pt (did training finish an epoch?); "
                              "pass a run folder with weights or a .pt file")
        return best, source
    if not source.exists():
        raise RunDirError(f"{source} does not exist; pass a run folder (runs/NAME) or a .pt weights file")
    if source.suffix != ".pt":
        raise ModelError(f"{source} is not a .pt file; export starts from PyTorch weights (a run's weights/best.pt)")
    run_dir = source.parent.parent
    return source, run_dir if (run_dir / "run.json").is_file() or (run_dir / "data.yaml").is_file() else None


def parity_files(config: ExportConfig, run_dir: Path | None, data_yaml: str | None) -> list[Path]:
    """The first N images of --images, else of the run's val set, else of the val set the .pt was trained on."""
    if config.images:
        return sources.resolve(config.images)[: config.parity_images]
    from detector.data import datasets

    for candidate in ([run_dir / "data.yaml"] if run_dir else []) + ([Path(data_yaml)] if data_yaml else []):
        if candidate.is_file():
            try:
                val = datasets.load(candidate).splits["val"]
            except Exception:  # a moved or edited dataset: try the next source, then ask for --images
                continue
            return [Path(f) for f in sorted(val)[: config.parity_images]]
    raise ExportError("no images for the parity check: the weights' val set cannot be found; "
                      "pass --images with an image, a folder or a glob")


def check_config(config: ExportConfig, formats: dict) -> None:
    """Refuse options that cannot work, before anything is loaded or written."""
    if config.format not in formats:
        raise UsageError(f"unknown export format {config.format!r}; choose one of {', '.join(formats)}")
    if config.imgsz is not None and (config.imgsz < 32 or config.imgsz % 32):
        raise UsageError(f"--imgsz {config.imgsz} must be a positive multiple of 32 (the model's largest stride)")
    if config.parity_images < 1:
        raise UsageError("--parity-images must be at least 1: every export is checked")
    if not 0 < config.conf < 1:
        raise UsageError(f"--conf {config.conf} must lie between 0 and 1")


def run(config: ExportConfig) -> Path:
    """Export, check parity, write export.json; return the exported file. ExportError when parity fails."""
    from detector.yolo import checks, inference

    check_config(config, inference.export_formats())
    if config.out is not None:  # beside the weights is the run's own folder; anywhere else, the path rule
        paths.check_writes([config.out], [config.source], allow_run=paths.enclosing_run(config.source))
    weights, run_dir = resolve_weights(config.source)
    model_defaults = inference.model_defaults(inference.load_model(weights))
    imgsz = config.imgsz or int(model_defaults["imgsz"] or 640)
    files = parity_files(config, run_dir, model_defaults["data"])
    images = [sources.read(f) for f in files]  # an unreadable image stops us before exporting

    dest = Path(config.out).expanduser() if config.out else weights.parent
    with _staging(dest) as stage:
        exported, export_s = _export_staged(weights, stage, dest, config, imgsz)
        log.info(f"Checking parity on {len(files)} image(s) at conf {config.conf}...")
        figures = compare(weights, exported, config.format, imgsz, files, images, config.conf, config.iou_match)
        final = dest / exported.name
        record = {
            "format": config.format, "file": exported.name, "path": str(final.resolve()),
            "weights": str(weights.resolve()), "run_dir": str(run_dir.resolve()) if run_dir else None,
            "imgsz": imgsz, "opset": _onnx_opset(exported), "half": config.half, "dynamic": config.dynamic,
            "simplify": config.simplify, "file_size_bytes": _size(exported),
            "file_size_mb": round(_size(exported) / 2**20, 2), "export_s": round(export_s, 2),
            **figures, "versions": checks.versions(),
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        fileio.write_json(stage / EXPORT_JSON, record)
        _place(exported, stage / EXPORT_JSON, dest)
    _report(record, config, dest / EXPORT_JSON)
    return final


@contextlib.contextmanager
def _staging(dest: Path):
    """A staging folder inside dest (created if need be): removed on the way out, with dest if this made it.

    Ultralytics writes beside the weights it exports, so the export is made from a copy
    in here; nothing appears under its own name in dest until export and export.json are
    complete. A staging folder a killed export left behind is removed first.
    """
    created = [p for p in [dest, *dest.parents] if not p.exists()]
    try:
        dest.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise RunDirError(f"cannot create {dest}: {e.strerror or e}; pass a writable --out") from None
    fileio.remove_stale(dest)
    stage = fileio.staging_name(dest)
    ok = False
    try:
        stage.mkdir()
        yield stage
        ok = True
    except DiskFull as e:  # name the file in dest, not its staged copy
        if e.filename and Path(e.filename).is_relative_to(stage):
            raise fileio.disk_full(dest / Path(e.filename).relative_to(stage)) from None
        raise
    finally:
        shutil.rmtree(stage, ignore_errors=True)
        for p in created if not ok else []:  # deepest first, and only when empty
            with contextlib.suppress(OSError):
                p.rmdir()


def _export_staged(weights: Path, stage: Path, dest: Path, config: ExportConfig, imgsz: int) -> tuple[Path, float]:
    """Export a copy of weights inside stage; return the exported file (in stage) and the seconds it took.

    Errors name the user's weights and destination, never the staging copy.
    """
    from detector.yolo import inference

    log.info(f"Exporting {weights} to {config.format} at imgsz {imgsz} (CPU)...")
    t0 = time.time()
    source = stage / "source"
    source.mkdir()
    staged = source / weights.name
    target = dest / f"{weights.stem}{_suffix(config.format)}"  # what a full disk is said to stop
    try:
        fileio.copy_file(weights, staged)
    except DiskFull:
        raise fileio.disk_full(target) from None
    options = {"half": config.half, "dynamic": config.dynamic, "simplify": config.simplify, "opset": config.opset}
    try:
        made = inference.export_model(staged, config.format, imgsz, **options)
    except Exception as e:
        if fileio.is_disk_full(e):  # the exporter's own writes: name the export as it will be called
            raise fileio.disk_full(target) from None
        if not isinstance(e, DetectorError):
            raise
        text = str(e).replace(str(staged), str(weights)).replace(str(source), str(dest)).replace(str(stage), str(dest))
        raise type(e)(text) from None
    exported = stage / made.name
    fileio.rename(made, exported)
    shutil.rmtree(source, ignore_errors=True)
    return exported, time.time() - t0


def _suffix(fmt: str) -> str:
    from detector.yolo import inference

    return inference.export_formats().get(fmt, "")


def _place(exported: Path, record: Path, dest: Path) -> None:
    """Move the export and its export.json into dest, in the order that never pairs a record with another file.

    The old export.json goes first, then the export, then the new export.json: a kill in
    between leaves an export without a record, never a record that vouches for the wrong file.
    """
    old = dest / EXPORT_JSON
    if old.exists():
        old.unlink()
        fileio.fsync_dir(dest)
    fileio.move_into(exported, dest)
    fileio.move_into(record, dest)


def _report(record: dict, config: ExportConfig, out_json: Path) -> None:
    """Print the parity and latency figures; raise ExportError when the export fails the check."""
    p, lat = record["parity"], record["latency_ms_per_image"]
    matched = p["matched_final"] + p["matched_candidates"]
    log.info(f"Parity: max |raw diff| {p['max_abs_diff']:.3g} (boxes {p['max_abs_diff_boxes_px']:.3g} px, scores "
             f"{p['max_abs_diff_scores']:.3g}); {matched}/{p['boxes_compared']} boxes matched "
             f"(same class, IoU >= {config.iou_match})")
    log.info(f"Latency (CPU, batch 1): pt {lat['pt']:.2f} ms/image, {config.format} {lat['export']:.2f} ms/image")
    if not p["boxes_compared"]:
        log.info(f"Warning: no box scored {config.conf} or more on these images, so only raw outputs were compared; "
                 "lower --conf or pass --images with images the model detects things in")
    if p["max_abs_diff_scores"] > SCORE_TOLERANCE:
        raise ExportError(f"the {config.format} export's class scores differ from the .pt's by up to "
                          f"{p['max_abs_diff_scores']:.3g} (tolerance {SCORE_TOLERANCE}); see {out_json}")
    if not p["passed"]:
        raise ExportError(f"the {config.format} export does not detect what the .pt detects: "
                          f"{p['boxes_compared'] - matched} of {p['boxes_compared']} boxes unmatched "
                          f"(first: {p['unmatched'][0]}); see {out_json}")


def compare(weights: Path, exported: Path, fmt: str, imgsz: int, files: list[Path], images: list,
            conf: float, iou_match: float) -> dict:
    """Parity and latency figures of the .pt against its export on the same letterboxed images."""
    import torch

    from detector.yolo import inference

    tensors = [inference.letterbox(im, imgsz) for im in images]
    pt_forward = inference.torch_forward(weights, imgsz)
    threads = torch.get_num_threads()  # Ultralytics sets this at import; onnxruntime gets the same, for a fair race
    ex_forward = onnx_forward(exported, threads) if fmt == "onnx" else inference.backend_forward(exported)
    raw_pt, ms_pt = _timed(pt_forward, tensors)
    try:
        raw_ex, ms_ex = _timed(ex_forward, tensors)
    except Exception as e:  # an export that loads but cannot run is a failed export
        raise ExportError(f"the exported model {exported} cannot run: {str(e).splitlines()[0]}") from None
    diffs = [parity.raw_differences(a, b) for a, b in zip(raw_pt, raw_ex)]  # ExportError on another layout
    worst = {k: max(d[k] for d in diffs) for k in diffs[0]}
    matching = parity.Matching()
    for name, a, b in zip(sources.relative_names(files), raw_pt, raw_ex):
        parity.match_detections(inference.nms(a, conf)[0], inference.nms(b, conf)[0], a[0], b[0], conf, iou_match,
                                image=name, into=matching, labels=("pt", fmt), frame=(imgsz, imgsz))
    return {
        "output_shape": list(raw_ex[0].shape),
        "parity": {
            "images": len(files), "image_files": [str(f) for f in files], "conf": conf, "iou_match": iou_match,
            **worst, "score_tolerance": SCORE_TOLERANCE, **_renamed(matching.summary()),
            "passed": matching.passed and worst["max_abs_diff_scores"] <= SCORE_TOLERANCE,
        },
        "latency_ms_per_image": {"pt": ms_pt, "export": ms_ex, "batch": 1, "device": "cpu", "threads": threads,
                                 "images": len(files), "statistic": "median"},
    }


def _renamed(summary: dict) -> dict:
    """parity.Matching's model A/B counts under the names of the two models compared here."""
    summary["boxes_pt"], summary["boxes_export"] = summary.pop("boxes_a"), summary.pop("boxes_b")
    return summary


def onnx_forward(path: Path, threads: int | None = None):
    """Run an .onnx file with onnxruntime directly (not through Ultralytics): (N,3,H,W) float32 -> raw output.

    threads: intra-op threads (None: onnxruntime's default, one per physical core).
    """
    import numpy as np
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    try:
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as e:
        raise ModelError(f"onnxruntime cannot load {path}: {str(e).splitlines()[0]}") from None
    inp = session.get_inputs()[0]
    dtype = np.float16 if inp.type == "tensor(float16)" else np.float32

    def forward(x):
        return session.run(None, {inp.name: x.astype(dtype)})[0].astype(np.float32)

    return forward


def _timed(forward, tensors: list) -> tuple[list, float]:
    """Outputs for each tensor and the median milliseconds per call, after two warm-up calls."""
    for _ in range(2):
        forward(tensors[0])
    outputs, times = [], []
    for x in tensors:
        t = time.perf_counter()
        outputs.append(forward(x))
        times.append((time.perf_counter() - t) * 1000)
    return outputs, round(statistics.median(times), 3)


def _size(path: Path) -> int:
    if path.is_dir():
        return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    return path.stat().st_size


def _onnx_opset(path: Path) -> int | None:
    """The default-domain opset of an .onnx file (None for other formats)."""
    if path.suffix != ".onnx":
        return None
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return next((int(o.version) for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
