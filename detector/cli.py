"""The command line: each command parses options, calls one library function, prints.

Library code raises DetectorError; `_report_errors` is the only place that turns
them into one-line messages with a non-zero exit. Heavy imports (torch,
ultralytics) happen inside commands so `--help` stays instant.
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path

import click

from detector import __version__
from detector.errors import DetectorError


class _Failure(click.ClickException):
    """A DetectorError shown as 'Error: <one line>' with the error's own exit code."""

    def __init__(self, error: DetectorError):
        super().__init__(str(error))
        self.exit_code = error.exit_code


def _report_errors(fn):
    """Turn DetectorError into a one-line ClickException (no traceback)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except DetectorError as e:
            raise _Failure(e) from None

    return wrapper


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="detector")
def main():
    """Train YOLO detectors with Ultralytics and make batch size a choice you understand.

    \b
    Example:
        detector train                      # the built-in dataset, batch auto
        detector train --data data.yaml --model yolo11n.yaml --epochs 50
    """


@main.command(context_settings={"ignore_unknown_options": False})
@click.option("--data", type=click.Path(path_type=Path), default=None,
              help="YOLO data YAML. Default: the built-in shapes dataset (generated once, cached).")
@click.option("--model", default="yolo11n.yaml", show_default=True,
              help="Model YAML name (yolo11n.yaml, yolov8s.yaml, ...) or a local .pt file. Nothing is downloaded.")
@click.option("--epochs", type=int, default=None, help="Epochs. Default 100; 20 on the built-in dataset.")
@click.option("--imgsz", type=int, default=None, help="Training image size. Default 640; 128 on the built-in dataset.")
@click.option("--batch", default="auto", show_default=True,
              help="Images per iteration: 'auto' (GPU: largest candidate that fits; CPU: 16) or an integer.")
@click.option("--device", default=None, help="cpu, 0, or 0,1 for two GPUs. Default: GPU 0 if present, else CPU.")
@click.option("--workers", type=int, default=8, show_default=True, help="Data loader worker processes (CPU training uses 0).")
@click.option("--seed", type=int, default=0, show_default=True, help="Random seed.")
@click.option("--name", default=None, help="Run folder name under --project. Default: train-<date>-<time>.")
@click.option("--project", type=click.Path(path_type=Path), default=Path("runs"), show_default=True,
              help="Folder that holds run folders.")
@click.option("--resume", "resume", type=click.Path(path_type=Path), default=None, metavar="RUN_DIR",
              help="Continue an interrupted run from its last completed epoch, appending to its record.")
@click.argument("overrides", nargs=-1, metavar="[KEY=VALUE]...")
@_report_errors
def train(data, model, epochs, imgsz, batch, device, workers, seed, name, project, resume, overrides):
    """Train a detector and record every iteration and epoch under PROJECT/NAME.

    Any other Ultralytics training argument can follow as KEY=VALUE
    (lr0=0.01 optimizer=AdamW mosaic=0 nbs=32 ...).

    \b
    Examples:
        detector train                                   # built-in dataset, ~3 min on a laptop CPU
        detector train --data ../shared/data/coco128/coco128.yaml --model yolo11n.yaml \\
            --epochs 3 --imgsz 320 --batch 16 --name c128
        detector train --resume runs/c128                # continue after Ctrl-C

    Writes runs/NAME/run.json, iterations.csv, epochs.csv and weights/best.pt.
    """
    from detector import train as training

    config = training.TrainConfig(
        data=data, model=model, epochs=epochs, imgsz=imgsz, batch=batch, device=device, workers=workers,
        seed=seed, name=name, project=project, resume=resume, overrides=training.parse_overrides(overrides),
        command=tuple(["detector", *sys.argv[1:]]),
    )
    run_dir = training.run(config, echo=click.echo)
    click.echo(f"Results: {run_dir}/run.json, iterations.csv, epochs.csv, weights/best.pt")


if __name__ == "__main__":  # pragma: no cover
    main()
