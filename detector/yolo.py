"""The one module that imports Ultralytics: model checks, the recording trainer, training.

Everything Ultralytics-specific lives here, so an Ultralytics upgrade touches one
file. The trainer subclass copies the few fields the record needs into plain rows
and hands them to detector.recorder; it copes with what the 8.4 trainer really
does: an epoch restarted after an out-of-memory batch halving or a NaN recovery,
the extra `on_fit_epoch_end` of the final validation on best.pt, and callbacks
running on every DDP rank (only rank 0 records).
"""

from __future__ import annotations

import re
import time
from pathlib import Path

from detector import runtime

runtime.prepare()  # before ultralytics is imported: offline, private settings, local font

import torch  # noqa: E402
from ultralytics import YOLO  # noqa: E402
from ultralytics.cfg import DEFAULT_CFG, DEFAULT_CFG_DICT  # noqa: E402
from ultralytics.engine import trainer as _ul_trainer  # noqa: E402
from ultralytics.models.yolo.detect import DetectionTrainer  # noqa: E402
from ultralytics.nn.tasks import guess_model_task, yaml_model_load  # noqa: E402
from ultralytics.utils import LOGGER, RANK  # noqa: E402

from detector.errors import ModelError, UsageError  # noqa: E402
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
        return str(p.resolve())
    if p.suffix not in {".yaml", ".yml"}:
        raise ModelError(f"unknown model {model!r}; {hint}")
    if p.is_file():
        spec = str(p.resolve())
    else:
        try:
            yaml_model_load(model)  # looks inside the installed ultralytics/cfg/models only
        except (FileNotFoundError, OSError):
            raise ModelError(f"unknown model {model!r}: no such local file or built-in YAML; {hint}") from None
        spec = model
    try:
        task = guess_model_task(spec)
    except Exception:  # an unreadable YAML
        raise ModelError(f"model YAML {model} cannot be read as an Ultralytics model definition") from None
    if task != "detect":
        raise ModelError(f"model {model} is a {task} model; detector trains detection models (e.g. yolo11n.yaml)")
    return spec


def versions() -> dict:
    """Versions of the libraries a run depends on, for run.json."""
    import platform

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
        if last:  # time_s continues across a resume
            self.time_offset = float(last["time_s"])
        if trainer.start_epoch:
            self.rec.event("resumed", from_epoch=trainer.start_epoch + 1, iteration=self.iteration)
        data = self.rec.read()
        batch = {**data.get("batch", {}), "used": trainer.batch_size}
        groups = trainer.optimizer.param_groups
        self.rec.update(
            batch=batch,
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
                self.rec.event("oom_step_down", epoch=epoch, iteration=self._epoch_rows + 1,
                               discarded_iterations=discarded, **{"from": self._epoch_batch, "to": trainer.batch_size})
                data = self.rec.read()
                self.rec.update(batch={**data.get("batch", {}), "used": trainer.batch_size},
                                accumulate=trainer.accumulate, iterations_per_epoch=len(trainer.train_loader))
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
        if self.in_final:  # the extra call after validating best.pt: not an epoch
            self.rec.update(final={
                "weights": str(trainer.best), "precision": m.get("metrics/precision(B)"),
                "recall": m.get("metrics/recall(B)"), "map50": m.get("metrics/mAP50(B)"),
                "map50_95": m.get("metrics/mAP50-95(B)"),
            })
            return
        row = {f"train_{k}": float(v) for k, v in (trainer.tloss or {}).items()}
        if self.validated:
            row.update(precision=m.get("metrics/precision(B)"), recall=m.get("metrics/recall(B)"),
                       map50=m.get("metrics/mAP50(B)"), map50_95=m.get("metrics/mAP50-95(B)"))
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

    def __init__(self, cfg=DEFAULT_CFG, overrides=None, _callbacks=None):
        super().__init__(cfg, overrides, _callbacks)
        self.tap = _Tap(self) if RANK in {-1, 0} else None
        if self.tap:
            for event in ("on_pretrain_routine_end", "on_train_epoch_start", "on_train_batch_start",
                          "on_train_batch_end", "on_fit_epoch_end"):
                self.add_callback(event, getattr(self.tap, event))

    def preprocess_batch(self, batch):
        batch = super().preprocess_batch(batch)
        if self.tap:
            self.tap.batch_size = int(batch["img"].shape[0])
        return batch

    def optimizer_step(self):
        super().optimizer_step()
        if self.tap:
            self.tap.opt_steps += 1

    def validate(self):
        if self.tap:
            self.tap.validated = True
        return super().validate()

    def final_eval(self):
        if self.tap:
            self.tap.in_final = True
        try:
            super().final_eval()
        finally:
            if self.tap:
                self.tap.in_final = False


def train(overrides: dict) -> dict:
    """Train with the record attached; return what the trainer ended with."""
    model = YOLO(overrides["model"])
    model.train(trainer=RecordingTrainer, **overrides)
    return _outcome(model.trainer)


def resume(last_pt: Path, overrides: dict) -> dict:
    """Continue a run from its last.pt, appending to the same record."""
    model = YOLO(str(last_pt))
    model.train(trainer=RecordingTrainer, resume=str(last_pt), **overrides)
    return _outcome(model.trainer)


def _outcome(trainer) -> dict:
    return {"batch_used": trainer.batch_size, "epochs": trainer.epochs, "best": str(trainer.best)}
