"""The Python API: the library functions the CLI calls, and objects that show themselves in notebooks.

    import detector
    run = detector.train(epochs=5, imgsz=96, name="demo")    # -> Run (run.epochs: a pandas DataFrame)
    report = detector.compare(["runs/demo", "runs/other"])   # -> Report, shown inline in Jupyter

Keyword names are the training options' (TrainConfig fields or their flags, e.g.
batch_candidates); any other keyword is an Ultralytics training argument, as
KEY=VALUE is on the command line. Errors are the DetectorError subclasses the
CLI turns into one line. While a call trains, progress prints one line per
epoch (detector.progress) instead of Ultralytics' per-iteration bars.
"""

from __future__ import annotations

import functools
import inspect
import sys
import traceback
from dataclasses import fields
from pathlib import Path

from detector import progress
from detector.config import SWEEP_OPTIONS, TrainConfig, declared_options
from detector.errors import UsageError
from detector.views import Report, Run, Sweep

__all__ = ["train", "resume", "sweep", "compare", "plan", "export", "predict", "open_run", "Run", "Report", "Sweep"]


def _lets_go_on_error(fn):
    """Free what a failed or interrupted call held before its error reaches the caller.

    A notebook keeps the last error (sys.last_value) and so its traceback, whose frames hold the
    trainer's model, optimizer and batch on the GPU: the next training in that kernel would start on top
    of them. A published batch-16 run read 8.5 GiB at its first epoch because a batch-32 attempt
    interrupted just before it in the same kernel (8.39 GiB) was still held
    (tests/data/gpu_memory_calibration.csv, t4-bees-v11n-b16-800). The command line needs none of this:
    its process ends.
    """

    @functools.wraps(fn)
    def call(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except BaseException as e:
            _drop_frames(e)
            raise

    return call


def _drop_frames(error: BaseException) -> None:
    """Clear the locals of the finished frames an error and the errors it chains passed through; empty the
    CUDA cache. The traceback keeps its files and line numbers."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        traceback.clear_frames(error.__traceback__)  # frames still running (the caller's) are skipped
        error = error.__cause__ or error.__context__
    if "torch" in sys.modules:  # nothing was on a GPU otherwise
        from detector.yolo.recording import release_device_memory

        release_device_memory()


def open_run(path) -> Run:
    """A run folder read from disk (finished, interrupted or still training)."""
    return Run.open(path)


def train_config(**options) -> TrainConfig:
    """The TrainConfig that keyword options describe: declared options by field or flag name, the rest overrides."""
    from detector import options as cli_options

    declared = declared_options()
    by_name = {}
    for name, f in declared.items():
        by_name[cli_options.param_name(f)] = (name, f)
        if not name.startswith("batch."):
            by_name.setdefault(name, (name, f))  # the field name too: grad_stats=False
    params, overrides = {}, dict(options.pop("overrides", None) or {})
    for key, value in options.items():
        if key not in by_name:
            overrides[key] = value
            continue
        name, f = by_name[key]
        if f.metadata.get("negate") and key == name:  # grad_stats=False is --no-grad-stats
            value = not value
        if f.metadata.get("path") and value is not None:
            value = Path(value)
        params[cli_options.param_name(f)] = value
    config = cli_options.train_config(params, overrides=overrides)
    from dataclasses import replace

    return replace(config, command=("detector", "train", *config.to_argv()))


@_lets_go_on_error
def train(data=None, **options) -> Run:
    """Train one run (as `detector train`) and return it; with resume=PATH, continue that run."""
    from detector.train import run as training

    config = train_config(data=data, **options)
    with progress.shown(config.project):
        run_dir = training.run(config)
    return Run.open(run_dir)


def resume(path, device=None, **options) -> Run:
    """Continue an interrupted run from its last completed epoch (as `detector train --resume PATH`)."""
    return train(resume=path, device=device, **options)


@_lets_go_on_error
def sweep(batches, seeds=(0,), semantics: str = "accumulate", lr_scaling: str | None = None, name: str | None = None,
          backend: str = "local", address: str | None = None, gpus_per_run: float | None = None,
          cpus_per_run: float | None = None, **options) -> Sweep:
    """One run per batch size and seed, then the comparison (as `detector sweep`); returns the Sweep."""
    from detector.train import sweep as sweeping

    allowed = {*SWEEP_OPTIONS, "project"}
    template = train_config(**options)
    extra = [n for n in template.to_argv(skip=allowed) if n.startswith("--")]
    if extra:
        raise UsageError(f"{extra[0]} is not an option of a sweep (it sets each run's batch, seed and name)")
    config = sweeping.SweepConfig(batches=sweeping.parse_ints(batches, "--batch", minimum=1),
                                  seeds=sweeping.parse_ints(seeds, "--seeds"), template=template, name=name,
                                  semantics=semantics, lr_scaling=lr_scaling)
    with progress.shown(template.project):
        if backend == "ray":
            from detector.train import sweep_ray

            html = sweep_ray.run(config, sweep_ray.RayOptions(address=address, gpus_per_run=gpus_per_run,
                                                              cpus_per_run=cpus_per_run))
        elif backend == "local":
            html = sweeping.run(config)
        else:
            raise UsageError(f"backend must be 'local' or 'ray', not {backend!r}")
    return Sweep(html.parent)


def compare(paths, out=None) -> Report:
    """Compare runs (a sweep folder stands for its runs) and write the report (as `detector compare`)."""
    from detector.report import render

    paths = [paths] if isinstance(paths, (str, Path)) else [p.path if isinstance(p, Run) else p for p in paths]
    paths = [Path(p) for p in paths]
    html = render.compare(paths, Path(out) if out is not None else render.default_out(paths))
    return Report(html)


@_lets_go_on_error
def plan(data=None, gpu_memory=None, classes: int | None = None, boxes_per_image: int | None = None, **options):
    """What `detector batch` answers: the BatchDecision here, or with gpu_memory=[GB, ...] the GpuPlan."""
    from detector.train import autobatch

    config = train_config(data=data, **options)
    with progress.shown(None):
        if gpu_memory is None:
            return autobatch.dry_run(config)
        from detector.train import gpuplan

        gpuplan.check_counts(classes, boxes_per_image)
        return gpuplan.plan(config, gpuplan.parse_gpu_sizes(gpu_memory), classes, boxes_per_image)


@_lets_go_on_error
def export(source, format: str = "onnx", **options) -> Path:
    """Export a run's best.pt (or a .pt) and check parity (as `detector export`); returns the exported model."""
    from detector.deploy import export as exporting

    source = source.path if isinstance(source, Run) else Path(source)
    config = exporting.ExportConfig(source=source, format=format.lower(), **_paths(options, "out"))
    with progress.shown(None):
        return exporting.run(config)


@_lets_go_on_error
def predict(weights, source, **options) -> Path:
    """Detect objects in images (as `detector predict`); returns the output folder."""
    from detector.deploy import predict as predicting

    weights = weights.path if isinstance(weights, Run) else Path(weights)
    config = predicting.PredictConfig(weights=weights, source=str(source), **_paths(options, "out", "coco_gt"))
    with progress.shown(None):
        return predicting.run(config)


def _paths(options: dict, *names: str) -> dict:
    return {k: Path(v) if k in names and v is not None else v for k, v in options.items()}


def _train_signature() -> inspect.Signature:
    """train()'s signature for help() and tab completion: every declared option with TrainConfig's default."""
    params = [inspect.Parameter("data", inspect.Parameter.POSITIONAL_OR_KEYWORD, default=None)]
    defaults = {f.name: f.default for f in fields(TrainConfig)}
    for name, f in declared_options().items():
        if name == "data":
            continue
        key = "batch" if name == "batch.requested" else name.replace(".", "_")
        default = f.default if name.startswith("batch.") else defaults.get(name, f.default)
        params.append(inspect.Parameter(key, inspect.Parameter.KEYWORD_ONLY, default=default))
    params.append(inspect.Parameter("overrides", inspect.Parameter.VAR_KEYWORD))
    return inspect.Signature(params, return_annotation=Run)


train.__signature__ = _train_signature()
