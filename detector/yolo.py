"""The one module that imports Ultralytics: model checks, the recording trainer, training.

Everything Ultralytics-specific lives here, so an Ultralytics upgrade touches one
file. The trainer subclass copies the few fields the record needs into plain rows
and hands them to detector.recorder; it copes with what the 8.4 trainer really
does: an epoch restarted after an out-of-memory batch halving or a NaN recovery,
the extra `on_fit_epoch_end` of the final validation on best.pt, and callbacks
running on every DDP rank (only rank 0 records).
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import platform
import re
import sys
import time
import warnings
from importlib import metadata
from pathlib import Path

import numpy as np

from detector import runtime

runtime.prepare()  # before ultralytics is imported: offline, private settings, local font

import torch  # noqa: E402
from ultralytics import YOLO  # noqa: E402
from ultralytics.cfg import DEFAULT_CFG, DEFAULT_CFG_DICT  # noqa: E402
from ultralytics.engine import trainer as _ul_trainer  # noqa: E402
from ultralytics.models.yolo.detect import DetectionTrainer  # noqa: E402
from ultralytics.nn.tasks import guess_model_task, yaml_model_load  # noqa: E402
from ultralytics.utils import LOGGER, RANK  # noqa: E402

from detector.errors import AugmentError, DeviceOutOfMemory, ExportError, ModelError, UsageError  # noqa: E402
from detector.recorder import Recorder  # noqa: E402

# GPUs Ultralytics' own AMP check rejects by name (its check_amp, 8.4).
_AMP_BAD_GPUS = re.compile(r"(nvidia|geforce|quadro|tesla).*?(1660|1650|1630|t400|t550|t600|t1000|t1200|t2000|k40m)", re.I)


def _offline_check_amp(model) -> bool:
    """Ultralytics' AMP check without its yolo26n.pt download: same GPU blocklist, no weights needed."""
    device = next(model.parameters()).device
    if device.type != "cuda":
        return False
    ok = not _AMP_BAD_GPUS.search(torch.cuda.get_device_name(device))
    LOGGER.info(f"AMP: offline check {'passed' if ok else 'failed, AMP disabled'} (no download)")
    return ok


_ul_trainer.check_amp = _offline_check_amp  # the trainer calls it by this module-level name

TRAIN_KEYS = frozenset(DEFAULT_CFG_DICT)
# Options the CLI owns; passing them as key=value would bypass its checks.
CLI_OWNED = frozenset({"data", "model", "epochs", "imgsz", "batch", "device", "workers", "seed", "name", "project",
                       "resume", "mode", "task", "exist_ok", "save_dir"})


def check_overrides(overrides: dict) -> None:
    """Refuse unknown Ultralytics training keys and keys that have their own option."""
    unknown = sorted(set(overrides) - TRAIN_KEYS)
    if unknown:
        raise UsageError(f"unknown training argument {unknown[0]!r}; see 'detector train --help' for key=value options")
    owned = sorted(set(overrides) & CLI_OWNED)
    if owned:
        raise UsageError(f"set {owned[0]!r} with its own option (--{owned[0].replace('_', '-')}), not as key=value")


def check_model(model: str) -> str:
    """Return a model spec Ultralytics can load offline: a built-in/local YAML or a local .pt."""
    p = Path(model).expanduser()
    hint = "nothing can be downloaded: use a model YAML such as yolo11n.yaml or a local .pt file"
    if p.suffix == ".pt":
        if not p.is_file():
            raise ModelError(f"weights file {model} not found; {hint}")
        load_model(p)  # a damaged or non-detection checkpoint is refused before any run folder exists
        return str(p.resolve())
    if p.suffix not in {".yaml", ".yml"}:
        raise ModelError(f"unknown model {model!r}; {hint}")
    spec = str(p.resolve()) if p.is_file() else model
    try:
        cfg = yaml_model_load(spec)  # a local file, or a name inside the installed ultralytics/cfg/models
    except (FileNotFoundError, OSError):
        raise ModelError(f"unknown model {model!r}: no such local file or built-in YAML; {hint}") from None
    except Exception:  # not YAML at all
        raise ModelError(f"model YAML {model} cannot be read as an Ultralytics model definition") from None
    try:
        task = guess_model_task(cfg)  # from the head module, not the file name
    except Exception:
        raise ModelError(f"model YAML {model} cannot be read as an Ultralytics model definition") from None
    if task != "detect":
        raise ModelError(f"model {model} is a {task} model; detector trains detection models (e.g. yolo11n.yaml)")
    return spec


def versions() -> dict:
    """Versions of the libraries a run depends on, for run.json."""
    import albumentations
    import ultralytics

    from detector import __version__

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "ultralytics": ultralytics.__version__,
        "albumentations": albumentations.__version__,
        "detector": __version__,
    }


def device_info(device: str | None) -> dict:
    """Name and memory of the device a run will use: CPU, or the first (smallest) CUDA device named."""
    if device in (None, "", "cpu") and not (device is None and torch.cuda.is_available()):
        return {"type": "cpu", "name": "cpu", "total_memory_gb": None}
    if not torch.cuda.is_available():
        raise UsageError(f"--device {device} asks for a GPU but PyTorch sees no CUDA device; use --device cpu")
    ids = [int(x) for x in str(device or "0").replace("cuda:", "").split(",") if x.strip()]
    props = [torch.cuda.get_device_properties(i) for i in ids]
    smallest = min(props, key=lambda p: p.total_memory)
    return {"type": "cuda", "name": smallest.name, "count": len(ids),
            "total_memory_gb": round(smallest.total_memory / 2**30, 2)}


# Our column names for the box metrics Ultralytics reports per validation.
_METRIC_KEYS = {"precision": "metrics/precision(B)", "recall": "metrics/recall(B)", "map50": "metrics/mAP50(B)",
                "map50_95": "metrics/mAP50-95(B)"}


class _Tap:
    """Copies trainer fields into plain rows for the recorder; lives on rank 0 only."""

    def __init__(self, trainer: "RecordingTrainer"):
        self.rec = Recorder(trainer.save_dir)
        self.iteration = self.images_seen = self.opt_steps = 0
        self.time_offset = 0.0
        self.epoch = None  # 1-based epoch of the attempt in progress
        self.batch_size = 0
        self.validated = self.in_final = False
        self.best = None

    # -- helpers ----------------------------------------------------------------
    def _restore(self, row: dict | None, keep_steps: bool = False) -> None:
        """Continue counters from the last kept iteration row (or from zero)."""
        self.iteration = int(row["iteration"]) if row else 0
        self.images_seen = int(row["images_seen"]) if row else 0
        if not keep_steps:
            self.opt_steps = int(row["optimizer_step"]) if row else 0

    def _gpu_gb(self, trainer, peak: bool = False):
        if trainer.device.type != "cuda":
            return None
        fn = torch.cuda.max_memory_reserved if peak else torch.cuda.memory_reserved
        return fn(trainer.device) / 2**30

    # -- callbacks --------------------------------------------------------------
    def on_pretrain_routine_end(self, trainer) -> None:
        self._train_start = time.time()
        last = self.rec.keep_epochs_through(trainer.start_epoch)  # resume: drop the unfinished epoch's rows
        self._restore(last)
        self._resume_base = last
        if last:  # time_s and the best epoch continue across a resume
            self.time_offset = float(last["time_s"])
            self.best = (self.rec.read().get("progress") or {}).get("best")
        if trainer.start_epoch:
            self.rec.event("resumed", from_epoch=trainer.start_epoch + 1, iteration=self.iteration)
        self.rec.merge("batch", used=trainer.batch_size)
        groups = trainer.optimizer.param_groups
        self.rec.update(
            nbs=trainer.args.nbs,
            accumulate=trainer.accumulate,
            optimizer=type(trainer.optimizer).__name__,
            lr0=max(g.get("initial_lr", g["lr"]) for g in groups),
            iterations_per_epoch=len(trainer.train_loader),
            amp=bool(trainer.amp),
            status="running",
        )

    def on_train_epoch_start(self, trainer) -> None:
        epoch = trainer.epoch + 1
        if self.epoch == epoch:  # Ultralytics restarted this epoch: drop the aborted attempt's rows
            last = self.rec.keep_epochs_through(epoch - 1) or self._resume_base
            discarded = self.iteration - (int(last["iteration"]) if last else 0)
            if trainer.batch_size != self._epoch_batch:
                # Weights did receive the aborted attempt's updates, so optimizer_step keeps counting them.
                self._restore(last, keep_steps=True)
                failed_at = self._epoch_rows + 1  # the iteration that ran out of memory, within the epoch
                self.rec.event("oom_step_down", epoch=epoch, iteration=self.iteration + failed_at,
                               epoch_iteration=failed_at, phase="training",
                               action="batch halved by Ultralytics, epoch restarted",
                               discarded_iterations=discarded, **{"from": self._epoch_batch, "to": trainer.batch_size})
                self.rec.merge("batch", used=trainer.batch_size)
                self.rec.update(accumulate=trainer.accumulate, iterations_per_epoch=len(trainer.train_loader))
            else:  # NaN recovery reloaded last.pt: the aborted updates are undone
                self._restore(last)
                self.rec.event("epoch_restarted", epoch=epoch, reason="NaN/Inf loss, weights reloaded from last.pt",
                               discarded_iterations=discarded)
        self.epoch = epoch
        self._epoch_batch = trainer.batch_size
        self._epoch_rows = self._epoch_images = 0
        self._epoch_train_time = 0.0
        self.validated = False
        if trainer.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(trainer.device)
        self._last_end = time.time()

    def on_train_batch_start(self, trainer) -> None:
        self._batch_start = time.time()

    def on_train_batch_end(self, trainer) -> None:
        now = time.time()
        names = list(trainer.loss_items)
        values = torch.stack([trainer.loss_items[k].float() for k in names]).tolist()  # one device sync
        world = max(trainer.world_size, 1)
        self.iteration += 1
        self._epoch_rows += 1
        images = self.batch_size * world
        self.images_seen += images
        self._epoch_images += images
        iter_time = now - self._last_end
        self._epoch_train_time += iter_time
        row = dict(zip(names, values))
        row.update(
            epoch=self.epoch, iteration=self.iteration, epoch_iteration=self._epoch_rows, batch_size=images,
            images_seen=self.images_seen, optimizer_step=self.opt_steps, loss=float(sum(values)),
            lr=float(trainer.optimizer.param_groups[0]["lr"]),
            time_s="%.3f" % (now - self._train_start + self.time_offset),
            iter_time_s="%.4f" % iter_time, data_time_s="%.4f" % (self._batch_start - self._last_end),
            gpu_mem_gb=self._gpu_gb(trainer),
        )
        self.rec.iteration(names, row)
        self._last_end = time.time()  # recording time is not counted as the next batch's data time

    def on_fit_epoch_end(self, trainer) -> None:
        names = list(trainer.loss_names)
        m = trainer.metrics or {}
        metrics = {ours: m.get(theirs) for ours, theirs in _METRIC_KEYS.items()}
        if self.in_final:  # the extra call after validating best.pt: not an epoch
            self.rec.update(final={"weights": str(trainer.best), **metrics})
            return
        row = {f"train_{k}": float(v) for k, v in (trainer.tloss or {}).items()}
        if self.validated:
            row.update(metrics)
            row.update({f"val_{k}": m.get(f"val/{k}") for k in names})
        row.update(
            epoch=trainer.epoch + 1, lr=float(trainer.lr.get("lr/pg0", 0.0)), epoch_time_s=trainer.epoch_time,
            images_per_s=self._epoch_images / self._epoch_train_time if self._epoch_train_time else None,
            peak_gpu_mem_gb=self._gpu_gb(trainer, peak=True),
        )
        self.rec.epoch(names, row)
        if row.get("map50_95") is not None and (self.best is None or row["map50_95"] > self.best["map50_95"]):
            self.best = {"epoch": row["epoch"], "map50_95": row["map50_95"], "map50": row["map50"]}
        self.rec.update(progress={"epochs_completed": trainer.epoch + 1, "epochs": trainer.epochs,
                                  "iterations_completed": self.iteration, "images_seen": self.images_seen,
                                  "optimizer_steps": self.opt_steps, "best": self.best})


class RecordingTrainer(DetectionTrainer):
    """Ultralytics' detection trainer with the run record attached.

    Callbacks are attached here rather than by the caller so they also exist in
    the processes Ultralytics spawns for DDP, which rebuild the trainer from its
    class alone.
    """

    tap_class = _Tap  # what copies trainer fields into the record (a benchmark times a subclass)

    def __init__(self, cfg=DEFAULT_CFG, overrides=None, _callbacks=None):
        super().__init__(cfg, overrides, _callbacks)
        self.tap = self.tap_class(self) if RANK in {-1, 0} else None
        if self.tap:
            for event in ("on_pretrain_routine_end", "on_train_epoch_start", "on_train_batch_start",
                          "on_train_batch_end", "on_fit_epoch_end"):
                self.add_callback(event, getattr(self.tap, event))

    def build_dataset(self, img_path, mode="train", batch=None):
        return single_thread_collate(super().build_dataset(img_path, mode, batch))  # see single_thread_collate

    def preprocess_batch(self, batch):
        batch = super().preprocess_batch(batch)
        if self.tap:
            self.tap.batch_size = int(batch["img"].shape[0])
            fake_device_memory(self.tap.batch_size, self.epoch + 1, self.tap._epoch_rows + 1)  # tests only
        return batch

    def optimizer_step(self):
        super().optimizer_step()
        if self.tap:
            self.tap.opt_steps += 1

    def validate(self):
        if self.tap:
            self.tap.validated = True
            fake_device_memory(2 * self.batch_size, self.epoch + 1, _AFTER_LAST_ITERATION, validation=True)
        return super().validate()

    def final_eval(self):
        if self.tap:
            self.tap.in_final = True
        try:
            super().final_eval()
        finally:
            if self.tap:
                self.tap.in_final = False


PlainTrainer = DetectionTrainer  # Ultralytics' trainer without the record, for benchmarks


def train(overrides: dict, trainer: type = RecordingTrainer) -> dict:
    """Train with the record attached; return what the trainer ended with.

    A device out-of-memory error that escapes Ultralytics is raised as DeviceOutOfMemory
    (see _fit), so the caller can step the batch down and resume.
    """
    return _fit(overrides["model"], trainer=trainer, **overrides)


def resume(last_pt: Path, overrides: dict) -> dict:
    """Continue a run from its last.pt, appending to the same record."""
    return _fit(str(last_pt), trainer=RecordingTrainer, resume=str(last_pt), **overrides)


def _outcome(trainer) -> dict:
    return {"batch_used": trainer.batch_size, "epochs": trainer.epochs, "best": str(trainer.best)}


# -- Albumentations pipelines and the training loader (issue 4: detector/augment.py, preview, bench) -------------------

def default_albumentations() -> list[dict]:
    """Ultralytics' own default Albumentations set, in A.to_dict form (what the `ultralytics` preset must equal)."""
    import albumentations as A
    from ultralytics.data.augment import Albumentations

    return [A.to_dict(t) for t in Albumentations(p=1.0, transforms=None).transform.transforms]


def albumentations_step(transforms: list[dict] | None):
    """Ultralytics' Albumentations step for a pipeline, as fn(image, boxes_xyxy, cls) -> (image, boxes_xyxy, cls).

    None if Ultralytics cannot build it (it then trains without it, logging why).
    """
    from ultralytics.data.augment import Albumentations
    from ultralytics.utils.instance import Instances


    with warnings.catch_warnings():  # A.from_dict warns about fields some classes' own to_dict writes (SafeRotate)
        warnings.simplefilter("ignore", UserWarning)
        step = Albumentations(p=1.0, transforms=None if transforms is None else list(transforms))
    if step.transform is None:
        return None

    def apply(image, boxes_xyxy, cls):
        labels = {
            "img": image, "cls": np.asarray(cls, dtype=np.float32).reshape(-1, 1),
            "instances": Instances(bboxes=np.asarray(boxes_xyxy, dtype=np.float32).reshape(-1, 4),
                                   segments=np.zeros((0, 1000, 2), dtype=np.float32), bbox_format="xyxy",
                                   normalized=False),
        }
        out = step(labels)
        h, w = out["img"].shape[:2]
        inst = out["instances"]
        inst.convert_bbox("xyxy")
        inst.denormalize(w, h)
        return out["img"], inst.bboxes.copy(), out["cls"].reshape(-1)

    return apply


def augment_sample(transforms: list[dict], image, boxes_xyxy, cls, seed: int = 0):
    """Run Ultralytics' Albumentations step on one image with pixel xyxy boxes; return (image, boxes_xyxy, cls)."""
    step = albumentations_step(transforms)
    if step is None:
        return None
    torch.manual_seed(seed)  # the step seeds Albumentations' own RNG from torch.initial_seed()
    return step(image, boxes_xyxy, cls)


def check_augmentations(transforms: list[dict], imgsz: int, source: str) -> None:
    """Dry-run a pipeline through Ultralytics' own Albumentations step; raise AugmentError if it cannot train."""
    said: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: said.append(record.getMessage())
    shown = LOGGER.handlers[:]  # the dry run's own log lines are kept for the error, not printed
    LOGGER.handlers[:] = [handler]
    try:
        image = np.random.default_rng(0).integers(0, 256, (imgsz, imgsz, 3), dtype=np.uint8)
        box = [imgsz * 0.3, imgsz * 0.35, imgsz * 0.7, imgsz * 0.65]
        for seed in range(3):
            out = augment_sample(transforms, image.copy(), [box], [0], seed=seed)
            if out is None:
                why = (said or ["unknown error"])[-1]
                raise AugmentError(f"{source}: Ultralytics cannot build this pipeline: {why}")
            if out[0].shape != (imgsz, imgsz, 3):
                raise AugmentError(f"{source}: the pipeline turns a {imgsz}x{imgsz} image into "
                                   f"{out[0].shape[1]}x{out[0].shape[0]}; every image of a batch must keep its size")
    except AugmentError:
        raise
    except Exception as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise AugmentError(f"{source}: the pipeline fails on a training sample: {type(e).__name__}: {first}") from None
    finally:
        LOGGER.handlers[:] = shown


class _SingleThreadCollate:
    """A dataset's collate_fn run with one PyTorch thread (a class, so worker processes can pickle it)."""

    def __init__(self, fn):
        self.fn = fn

    def __call__(self, batch):
        threads = torch.get_num_threads()
        if threads == 1:  # loader workers already run single-threaded
            return self.fn(batch)
        torch.set_num_threads(1)
        try:
            return self.fn(batch)
        finally:
            torch.set_num_threads(threads)


def single_thread_collate(dataset):
    """Make the loader stack a batch's images with one thread; return the dataset.

    With workers=0 (always, when Ultralytics trains on CPU) the batch is collated in
    the training process, whose PyTorch thread pool turns torch.stack of 16 640-px
    images into a multi-threaded copy: measured on the 2-core machine at 5.6-12 ms
    per image of wall time against 0.3-0.4 ms with one thread (docs/benchmarks.md,
    "Data loader"). Workers are single-threaded already, so they are unaffected.
    """
    dataset.collate_fn = _SingleThreadCollate(type(dataset).collate_fn)  # build_dataloader reads the attribute
    return dataset


def training_loader(data_yaml: Path, transforms: list[dict] | None, imgsz: int, batch: int, workers: int = 0,
                    seed: int = 0, overrides: dict | None = None, stock_collate: bool = False):
    """Ultralytics' training dataset and loader, built as DetectionTrainer builds them (augment on, shuffle on).

    transforms None keeps Ultralytics' default Albumentations set. Images are read from disk as batches
    need them; only `cache=ram`/`cache=disk` in overrides changes that. stock_collate keeps Ultralytics'
    own collate (for benchmarks); by default it is single-threaded as in training.
    """
    from ultralytics.cfg import get_cfg
    from ultralytics.data import build_dataloader, build_yolo_dataset
    from ultralytics.data.utils import check_det_dataset
    from ultralytics.utils.torch_utils import init_seeds

    args = {**(overrides or {}), "data": str(data_yaml), "imgsz": imgsz, "batch": batch, "workers": workers,
            "seed": seed, "mode": "train"}
    if transforms is not None:
        args["augmentations"] = list(transforms)
    cfg = get_cfg(DEFAULT_CFG, args)
    data = check_det_dataset(str(data_yaml))
    init_seeds(cfg.seed + 1 + RANK, deterministic=cfg.deterministic)  # as BaseTrainer.__init__ seeds
    dataset = build_yolo_dataset(cfg, data["train"], batch, data, mode="train", stride=32)
    if not stock_collate:
        single_thread_collate(dataset)
    loader = build_dataloader(dataset, batch=batch, workers=workers, shuffle=True, rank=-1, device="cpu")
    return dataset, loader, data["names"]


def augmented_batch(data_yaml: Path, transforms: list[dict] | None, imgsz: int, batch: int, seed: int = 0,
                    overrides: dict | None = None) -> dict:
    """The first training batch as the trainer's loader yields it, as numpy: images HWC RGB uint8 and boxes."""
    _, loader, names = training_loader(data_yaml, transforms, imgsz, batch, workers=0, seed=seed, overrides=overrides)
    b = next(iter(loader))
    return {
        "images": b["img"].permute(0, 2, 3, 1).contiguous().numpy(),  # Format already made it RGB
        "batch_idx": b["batch_idx"].numpy().astype(int),
        "cls": b["cls"].numpy().reshape(-1).astype(int),
        "bboxes": b["bboxes"].numpy(),  # normalized xywh
        "files": list(b["im_file"]),
        "names": {int(k): v for k, v in names.items()},
    }


# --- Export, parity and predict (issue 6: detector export / detector predict) ----------------------------------------



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


def save_fresh_model(model_yaml: str, path: Path) -> Path:
    """Save an untrained model built from a YAML as a .pt, for benchmarks that need no trained weights."""
    with _quiet_ultralytics():
        model = YOLO(check_model(model_yaml))
        path.parent.mkdir(parents=True, exist_ok=True)
        model.save(str(path))
    return path


# --- Batch-size sweeps (issue 5: detector sweep) ---------------------------------------------------------------
def default_train_arg(key: str):
    """Ultralytics' default for a training argument (lr0, optimizer, nbs, ...), as the trainer would use it."""
    return DEFAULT_CFG_DICT.get(key)


# -- Batch size (issue 3: --batch auto, the memory probe, out-of-memory step-down) --------------------------------

FAKE_OOM_ENV = "DETECTOR_FAKE_OOM"
_AFTER_LAST_ITERATION = 10**9  # the fake's position of an epoch's validation pass: after every iteration
# What PyTorch 2.x raises when its caching allocator cannot serve a request on a full GPU.
_REAL_OOM_TEXT = ("CUDA out of memory. Tried to allocate 20.00 MiB. GPU 0 has a total capacity of 15.77 GiB of which "
                  "1.06 MiB is free. Including non-PyTorch memory, this process has 15.76 GiB memory in use. Of the "
                  "allocated memory 14.90 GiB is allocated by PyTorch, and 101.23 MiB is reserved by PyTorch but "
                  "unallocated. If reserved but unallocated memory is large try setting "
                  "PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True to avoid fragmentation.  See documentation for "
                  "Memory Management  (https://pytorch.org/docs/stable/notes/cuda.html#environment-variables)")
# The texts Ultralytics' own first-epoch halving treats as running out of device memory.
# Ultralytics 8.4 treats the same texts as memory errors (trainer._do_train); matched lower-cased.
_MEMORY_ERRORS = ("out of memory", "cublas_status_alloc_failed", "cudnn_status_internal_error",
                  "unable to find an engine")


def is_out_of_memory(error: BaseException) -> bool:
    """True for PyTorch's device out-of-memory errors (torch.OutOfMemoryError or its RuntimeError text)."""
    return isinstance(error, torch.OutOfMemoryError) or (
        isinstance(error, RuntimeError) and any(s in str(error).lower() for s in _MEMORY_ERRORS))


def fake_device_memory(images: int, epoch: int | None = None, epoch_iteration: int | None = None,
                       validation: bool = False) -> None:
    """Tests only: act as a GPU too small for more than N images per pass, when DETECTOR_FAKE_OOM says so.

    This machine has no GPU, so the test suite fakes the one piece of hardware behaviour the
    step-down depends on. DETECTOR_FAKE_OOM="above=8[,val_above=16][,epoch=2[,iteration=2]]": from
    that epoch and iteration of it on (the probe counts as before epoch 1, an epoch's validation
    as after its last iteration), every training pass over more than 8 images, and every
    validation pass over more than val_above (default: above), raises PyTorch's real
    out-of-memory error. Unset, this does nothing.
    """
    spec = os.environ.get(FAKE_OOM_ENV)
    if not spec:
        return
    cfg = {k.strip(): int(v) for k, _, v in (kv.partition("=") for kv in spec.split(",") if kv.strip())}
    if images <= cfg["val_above" if validation and "val_above" in cfg else "above"]:
        return
    if "epoch" in cfg and (epoch is None or (epoch, epoch_iteration or 1) < (cfg["epoch"], cfg.get("iteration", 1))):
        return
    raise torch.OutOfMemoryError(_REAL_OOM_TEXT)


def release_device_memory() -> None:
    """Collect garbage and hand cached CUDA blocks back, after an out-of-memory error or a probe."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _fit(spec: str, **train_args) -> dict:
    """YOLO(spec).train(**train_args); an out-of-memory error leaves as DeviceOutOfMemory, memory freed first."""
    model = YOLO(spec)
    try:
        model.train(**train_args)
        return _outcome(model.trainer)
    except RuntimeError as e:
        if not is_out_of_memory(e):
            raise
        where = _oom_position(model.trainer)
        detail = (str(e).strip().splitlines() or ["out of memory"])[0][:160]
    # Out here the traceback and its frames, which hold the trainer's tensors, are gone; drop the
    # trainer too, so the next attempt starts on an empty device.
    model = None
    release_device_memory()
    at = f"epoch {where['epoch']}, {where['phase']}" if where["epoch"] else where["phase"]
    raise DeviceOutOfMemory(f"out of memory at batch {where['batch']} ({at}): {detail}", **where)


def _oom_position(trainer) -> dict:
    """Where training stood when it ran out of memory: batch, 1-based epoch and global iteration, phase."""
    tap = getattr(trainer, "tap", None)
    batch = int(getattr(trainer, "batch_size", 0) or 0)
    if tap is None or tap.epoch is None:
        return {"batch": batch, "epoch": None, "iteration": None, "epoch_iteration": None, "phase": "setup"}
    tap.rec.close()
    phase = "final validation" if tap.in_final else "validation" if tap.validated else "training"
    step = 1 if phase == "training" else 0  # in training, the iteration that failed is the next one
    return {"batch": batch, "epoch": tap.epoch, "iteration": tap.iteration + step,
            "epoch_iteration": tap._epoch_rows + step if step else None, "phase": phase}


def cuda_devices(device: str | None) -> list[dict]:
    """Index, name, total memory and memory already in use (CUDA context, other processes) per GPU named."""
    ids = [int(x) for x in str(device or "0").replace("cuda:", "").split(",") if x.strip()]
    out = []
    for i in ids:
        free, total = torch.cuda.mem_get_info(i)  # creates the context, so its memory is counted below
        outside = max(total - free - torch.cuda.memory_reserved(i), 0)
        out.append({"index": i, "name": torch.cuda.get_device_name(i), "total_memory_gb": total / 2**30,
                    "baseline_gb": outside / 2**30})
    return out


def probe_batch_memory(model_spec: str, nc: int, imgsz: int, candidates, device_index: int = 0,
                       train_labels: int = 1, val_labels: int = 1, amp=True, stop_above_gb: float | None = None):
    """Peak CUDA memory of real training steps and of a validation pass, per candidate batch (CUDA only).

    Candidates run in ascending order and the probe stops at the first out-of-memory error, or
    once a peak exceeds stop_above_gb (memory grows with the batch, so larger ones cannot fit),
    so a candidate that does not fit costs one failed step. The model is built here and thrown
    away; the training that follows builds its own. Returns batching.Measurement per probed batch.
    """
    if not torch.cuda.is_available():
        raise UsageError("the batch-size probe measures GPU memory and needs a CUDA device; on CPU --batch auto is 16")
    device = torch.device("cuda", device_index)
    release_device_memory()
    try:
        return _probe_candidates(model_spec, nc, imgsz, candidates, device, train_labels, val_labels, amp,
                                 stop_above_gb)
    finally:
        release_device_memory()
        torch.cuda.reset_peak_memory_stats(device)


class _ProbeModel:
    """The model, its EMA copy, optimizer and grad scaler as the trainer holds them during training."""

    def __init__(self, model_spec: str, nc: int, device, amp):
        import copy

        from ultralytics.cfg import get_cfg
        from ultralytics.nn.tasks import DetectionModel, load_checkpoint

        cfg = load_checkpoint(model_spec)[0].yaml if str(model_spec).endswith(".pt") else model_spec
        self.model = DetectionModel(cfg, nc=nc, verbose=False).to(device)
        self.model.args = get_cfg(DEFAULT_CFG)  # the loss reads its gains (box, cls, dfl) from here
        self.ema = copy.deepcopy(self.model).eval()  # validation runs on Ultralytics' EMA copy
        self.nc, self.device = nc, device
        use = amp not in {False, "fp32"} and device.type == "cuda" and _offline_check_amp(self.model)  # as the trainer
        self.amp = torch.bfloat16 if use and amp == "bf16" else use
        # AdamW keeps two state tensors per weight, SGD one: probing with AdamW covers either choice.
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-4)
        self.scaler = torch.amp.GradScaler(device.type, enabled=bool(self.amp) and amp != "bf16")

    def batch(self, n: int, imgsz: int, labels: int, half: bool = False) -> dict:
        """A synthetic batch as preprocess_batch leaves it: images in [0, 1], `labels` boxes on every image."""
        labels = max(labels, 1)
        k, d = n * labels, self.device
        img = torch.rand(n, 3, imgsz, imgsz, device=d)
        boxes = torch.cat([torch.rand(k, 2, device=d) * 0.8 + 0.1, torch.rand(k, 2, device=d) * 0.1 + 0.02], 1)
        return {"img": img.half() if half else img, "bboxes": boxes,
                "cls": torch.randint(0, self.nc, (k, 1), device=d).float(),
                "batch_idx": torch.arange(n, device=d).repeat_interleave(labels).float()}

    def train_steps(self, n: int, imgsz: int, labels: int, steps: int = 2) -> None:
        """Forward, loss, backward and optimizer step, as the trainer runs them (AMP included)."""
        from ultralytics.utils.torch_utils import autocast

        self.model.train()
        for _ in range(steps):  # the second step runs with the optimizer state the first one created
            fake_device_memory(n)
            batch = self.batch(n, imgsz, labels)
            with autocast(self.amp, device=self.device.type):
                loss, _ = self.model(batch)
            self.scaler.scale(loss.sum()).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.optimizer.zero_grad()
            del batch, loss

    def validate(self, n: int, imgsz: int, labels: int) -> None:
        """The validator's pass: half-precision EMA forward, validation loss and NMS."""
        from ultralytics.utils import nms

        half = bool(self.amp) and self.device.type == "cuda"
        model = self.ema.half() if half else self.ema.float()
        fake_device_memory(n, validation=True)
        with torch.inference_mode():
            batch = self.batch(n, imgsz, labels, half=half)
            preds = model(batch["img"])
            model.loss(batch, preds)
            nms.non_max_suppression(preds, 0.001, 0.7, multi_label=True, max_det=300,
                                    end2end=getattr(model, "end2end", False))
        self.ema.float()


def _probe_candidates(model_spec, nc, imgsz, candidates, device, train_labels, val_labels, amp, stop_above_gb):
    """The probe's loop, device-agnostic so its steps can be exercised on CPU; peaks are None off CUDA."""
    from detector.batching import Measurement

    probe = _ProbeModel(model_spec, nc, device, amp)
    out = []
    for b in sorted(candidates):
        phase, peaks = "training", {}
        try:
            _reset_peak(device)
            probe.train_steps(b, imgsz, train_labels)
            peaks["train_peak_gb"], allocated = _peak_gb(device)
            phase = "validation"
            _reset_peak(device)
            probe.validate(2 * b, imgsz, val_labels)  # Ultralytics validates at twice the training batch
            peaks["val_peak_gb"], val_allocated = _peak_gb(device)
            peaks["allocated_peak_gb"] = None if allocated is None else max(allocated, val_allocated)
            phase = None
        except RuntimeError as e:
            if not is_out_of_memory(e):
                raise
        if phase:  # out of memory: free the failed step's tensors, keep what was measured
            probe.optimizer.zero_grad()
            probe.ema.float()
            release_device_memory()
        m = Measurement(b, oom=phase, **peaks)
        out.append(m)
        if m.oom or (stop_above_gb is not None and m.peak_gb is not None and m.peak_gb > stop_above_gb):
            break
    return out


def _reset_peak(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def _peak_gb(device) -> tuple[float | None, float | None]:
    """Peak reserved (what actually runs out: tensors plus the allocator's cache) and allocated GiB since the reset."""
    if device.type != "cuda":
        return None, None
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_reserved(device) / 2**30, torch.cuda.max_memory_allocated(device) / 2**30


def ultralytics_autobatch(model_spec: str, nc: int, imgsz: int, device_index: int = 0, max_num_obj: int = 0,
                          dataset_size: int = 0) -> int:
    """Ultralytics' own AutoBatch (batch=-1) on the same model, for tools/bench_batch.py to compare against."""
    from ultralytics.nn.tasks import DetectionModel, load_checkpoint
    from ultralytics.utils.autobatch import check_train_batch_size

    if not torch.cuda.is_available():
        raise UsageError("Ultralytics' AutoBatch needs a CUDA device")
    cfg = load_checkpoint(model_spec)[0].yaml if str(model_spec).endswith(".pt") else model_spec
    model = DetectionModel(cfg, nc=nc, verbose=False).to(torch.device("cuda", device_index))
    try:
        return check_train_batch_size(model, imgsz, amp=_offline_check_amp(model), max_num_obj=max_num_obj,
                                      dataset_size=dataset_size)
    finally:
        model = None
        release_device_memory()
