"""Load, export and run detection models through Ultralytics (export, parity and predict use these)."""

from __future__ import annotations

import contextlib
import logging
import re
import sys
import warnings
from importlib import metadata
from pathlib import Path

import numpy as np
import torch
from ultralytics import YOLO

from detector.errors import ExportError, ModelError


# --- Export, parity and predict ----------------------------------------------------------------------------------------



def export_formats() -> dict[str, str]:
    """Ultralytics' export formats: the `format=` argument -> the exported file's suffix ('onnx' -> '.onnx')."""
    from ultralytics.engine.exporter import export_formats as _formats

    table = _formats()
    return dict(zip(table["Argument"][1:], table["Suffix"][1:]))  # row 0 is PyTorch itself


def _first_line(e: BaseException) -> str:
    """The first line of an exception's message, without colour codes or Ultralytics' 'ERROR ❌' prefix."""
    text = str(e).strip().splitlines()
    if not text:
        return type(e).__name__
    line = re.sub(r"\x1b\[[0-9;]*m", "", text[0])
    return re.sub(r"^(ERROR|WARNING)\s+[^\w\s]*\s*", "", line).rstrip(".")


def load_model(weights: Path):
    """Load a .pt or exported detection model for inference; ModelError if the file cannot be read."""
    if not Path(weights).exists():  # Ultralytics would try to download a missing file by name
        raise ModelError(f"weights {weights} not found")
    try:
        model = YOLO(str(weights), task="detect")
    except Exception as e:  # torch.load, onnx and friends raise anything on a damaged file
        raise ModelError(f"cannot load {weights}: {_first_line(e)}; is it a complete weights file?") from None
    if model.task != "detect":
        raise ModelError(f"{weights} is a {model.task} model; detector handles detection models")
    return model


def model_defaults(model) -> dict:
    """What a loaded .pt remembers from training: image size and data YAML (empty for exported models)."""
    args = getattr(model, "overrides", {}) or {}
    return {"imgsz": args.get("imgsz"), "data": args.get("data")}


@contextlib.contextmanager
def _quiet_ultralytics():
    """Silence Ultralytics' own log lines (banners, 'export failure') so the CLI prints one clear line."""
    logger = logging.getLogger("ultralytics")
    level = logger.level
    logger.setLevel(logging.CRITICAL + 1)
    try:
        yield
    finally:
        logger.setLevel(level)


def _not_installed(requirements) -> list[str]:
    """The requirement specs (as Ultralytics writes them) of which no candidate package is installed at all."""
    if isinstance(requirements, (str, Path)):
        requirements = [requirements]
    missing = []
    for r in requirements:
        candidates = r if isinstance(r, (list, tuple)) else [r]
        names = [re.match(r"([a-zA-Z0-9-_.]+)", str(c).rpartition("/")[-1])[1] for c in candidates]
        installed = False
        for name in names:
            try:
                metadata.version(name)
                installed = True
                break
            except metadata.PackageNotFoundError:
                continue
        if not installed:
            missing.append(str(candidates[0]))
    return missing


@contextlib.contextmanager
def _no_installs(fmt: str):
    """Make a missing export backend an ExportError that names what to pip install.

    With YOLO_AUTOINSTALL off, Ultralytics' check_requirements only logs a warning and
    returns False, and the export then dies later on an ImportError deep inside the
    exporter. Each exporter module holds its own reference to the function, so every
    loaded one is swapped for the duration of the export.
    """

    from ultralytics.utils import checks

    original = checks.check_requirements

    def strict(requirements=checks.ROOT.parent / "requirements.txt", exclude=(), install=True, cmds="", constrain=()):
        if original(requirements, exclude=exclude, install=False, cmds=cmds, constrain=constrain):
            return True
        missing = _not_installed(requirements)
        if missing:
            specs = " ".join(repr(m) for m in missing)
            raise ExportError(f"export format '{fmt}' needs {', '.join(missing)}, which is not installed and is "
                              f"never installed automatically; install it with: pip install {specs}")
        return False  # installed, only older than Ultralytics asks for: let the export try

    patched = [m for name, m in list(sys.modules.items())
               if name.startswith("ultralytics.") and getattr(m, "check_requirements", None) is original]
    for module in patched:
        module.check_requirements = strict
    checks.check_requirements = strict  # modules imported during the export bind the strict one
    try:
        yield
    finally:
        checks.check_requirements = original
        for module in patched:
            module.check_requirements = original
        for name, m in list(sys.modules.items()):
            if name.startswith("ultralytics.") and getattr(m, "check_requirements", None) is strict:
                m.check_requirements = original


def export_model(weights: Path, fmt: str, imgsz: int, half: bool = False, dynamic: bool = False,
                 simplify: bool = True, opset: int | None = None, batch: int = 1) -> Path:
    """Export a .pt with Ultralytics on the CPU and return the exported file (or folder); ExportError on failure."""
    model = load_model(weights)
    args = {"format": fmt, "imgsz": imgsz, "dynamic": dynamic, "simplify": simplify, "batch": batch,
            "device": "cpu", "verbose": False}
    if opset:
        args["opset"] = opset
    if half:
        args["quantize"] = 16  # 8.4's name for the deprecated half=True
    with _no_installs(fmt), _quiet_ultralytics():
        try:
            out = model.export(**args)
        except ExportError:
            raise
        except ImportError as e:
            package = e.name or _first_line(e)
            raise ExportError(f"export format '{fmt}' needs the Python package '{package}', which is not installed "
                              f"and is never installed automatically; install it with: pip install {package}") from None
        except Exception as e:
            raise ExportError(f"{fmt} export of {weights} failed: {_first_line(e)}") from None
    if not out or not Path(out).exists():
        raise ExportError(f"{fmt} export of {weights} produced no file")
    return Path(out)


def torch_forward(weights: Path, imgsz: int):
    """A function running the .pt as predict does (fused, eval, float32, CPU): (N,3,H,W) array -> raw output array."""
    module = load_model(weights).model.float().eval()
    with _quiet_ultralytics():
        module = module.fuse(verbose=False, imgsz=imgsz)

    def forward(x: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            y = module(torch.from_numpy(x))
        return _raw(y)

    return forward


def backend_forward(path: Path):
    """A function running any exported model through Ultralytics' AutoBackend on the CPU, raw output out."""
    from ultralytics.nn.autobackend import AutoBackend


    with _quiet_ultralytics(), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.load's deprecation notice, for TorchScript
        try:
            backend = AutoBackend(str(path), device=torch.device("cpu"), fp16=False, verbose=False)
        except Exception as e:
            raise ModelError(f"cannot load {path}: {_first_line(e)}") from None

    def forward(x: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return _raw(backend(torch.from_numpy(x)))

    return forward


def _raw(y) -> np.ndarray:
    """The (N, 4+nc, anchors) decoded head output from whatever container the model returned."""
    while isinstance(y, (list, tuple)):
        y = y[0]
    return (y.detach().float().cpu().numpy() if torch.is_tensor(y) else np.asarray(y)).astype(np.float32)


def letterbox(image: np.ndarray, imgsz: int) -> np.ndarray:
    """A BGR image as the exported model's input: letterboxed to imgsz square, RGB, 0..1, shape (1,3,imgsz,imgsz)."""
    from ultralytics.data.augment import LetterBox

    boxed = LetterBox(new_shape=(imgsz, imgsz), auto=False)(image=image)
    x = boxed[..., ::-1].transpose(2, 0, 1)[None].astype(np.float32) / 255.0
    return np.ascontiguousarray(x)


def nms(raw: np.ndarray, conf: float, iou: float = 0.7, max_det: int = 300) -> list[np.ndarray]:
    """Ultralytics' NMS as predict applies it, on raw head output: per image an (n, 6) array x1 y1 x2 y2 score cls."""
    from ultralytics.utils.nms import non_max_suppression

    out = non_max_suppression(torch.from_numpy(raw), conf, iou, max_det=max_det)
    return [o.numpy() for o in out]


def predict(model, images: list, conf: float, iou: float, imgsz: int | None, device: str) -> list[dict]:
    """Run a loaded model on BGR images; per image: xyxy boxes (original pixels), scores, classes, names, plot.

    rect=False letterboxes every format to the same square input, so a .pt and its
    export see identical pixels (a .pt would otherwise get a smaller rectangle).
    """
    kwargs = {"conf": conf, "iou": iou, "device": device, "rect": False, "verbose": False, "save": False}
    if imgsz:
        kwargs["imgsz"] = imgsz
    with _quiet_ultralytics():
        try:
            results = model.predict(images, **kwargs)
        except Exception as e:
            raise ModelError(f"cannot run the model: {_first_line(e)}") from None
    return [{"xyxy": r.boxes.xyxy.cpu().numpy(), "score": r.boxes.conf.cpu().numpy(),
             "cls": r.boxes.cls.cpu().numpy().astype(int), "names": dict(r.names), "plot": r.plot()} for r in results]


