"""The command line: each command parses options, calls one library function, prints.

Library code raises DetectorError; `_report_errors` is the only place that turns
them into one-line messages with a non-zero exit. Heavy imports (torch,
ultralytics) happen inside commands so `--help` stays instant.
"""

from __future__ import annotations

import functools
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


def _command_line() -> list[str]:
    """The current command as typed (options given on the command line), for run.json's `command`."""
    ctx = click.get_current_context()
    words = ctx.command_path.split()
    words[0] = "detector"
    from click.core import ParameterSource

    for param in ctx.command.params:
        if ctx.get_parameter_source(param.name) != ParameterSource.COMMANDLINE:
            continue
        value = ctx.params[param.name]
        values = list(value) if isinstance(value, (list, tuple)) else [value]
        if isinstance(param, click.Option):
            for v in values:
                words += [param.opts[-1]] if param.is_flag else [param.opts[0], str(v)]
        else:
            words += [str(v) for v in values]
    return words


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
@click.option("--augment", default=None, metavar="FILE|PRESET",
              help="Albumentations pipeline (a file A.save wrote, YAML or JSON) or preset: none, ultralytics, "
                   "light, heavy. Default: Ultralytics' own set (the 'ultralytics' preset).")
@click.argument("overrides", nargs=-1, metavar="[KEY=VALUE]...")
@_report_errors
def train(data, model, epochs, imgsz, batch, device, workers, seed, name, project, resume, augment, overrides):
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
        augment=augment, command=tuple(_command_line()),
    )
    run_dir = training.run(config, echo=click.echo)
    click.echo(f"Results: {run_dir}/run.json, iterations.csv, epochs.csv, weights/best.pt")


# ---- datasets: check, convert, synth (issue 7) ----

@main.group()
def datasets():
    """Check, convert and generate YOLO datasets before training on them.

    \b
    Examples:
        detector datasets check ../shared/data/coco128/coco128.yaml
        detector datasets convert --from coco instances.json --images img/ --out mydata
        detector datasets synth --images 200 --imgsz 96
    """


def _show_check(result, as_json: bool) -> None:
    """Print a check result (text or JSON) and fail with one line when it found errors."""
    from detector import dataset_check
    from detector.errors import DatasetError

    if as_json:
        import json

        click.echo(json.dumps(result.to_json(), indent=2))
    else:
        click.echo(dataset_check.format_report(result))
        click.echo(f"checked in {result.seconds:.2f} s")
    if not result.ok:
        raise DatasetError(f"{len(result.errors)} error(s) in {result.yaml} would break or silently damage training; "
                           "fix the files listed above")


@datasets.command("check")
@click.argument("data", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the summary and every problem as one JSON object.")
@_report_errors
def datasets_check(data, as_json):
    """Check a YOLO dataset: summary per split and every problem with its file and line.

    Errors (exit 1) are what breaks or silently damages training: unreadable or
    truncated images, label lines with the wrong field count, class ids out of
    range, coordinates outside 0..1, empty boxes, a split without labels.
    Warnings (exit 0): duplicate images, labels without images, and the like.

    \b
    Example:
        detector datasets check ../shared/data/coco128/coco128.yaml
        detector datasets check data.yaml --json > check.json
    """
    from detector import dataset_check
    from detector import datasets as ds

    _show_check(dataset_check.check(ds.load(data)), as_json)


@datasets.command("convert")
@click.option("--from", "fmt", type=click.Choice(["coco", "voc"]), required=True, help="Annotation format.")
@click.argument("annotations", type=click.Path(exists=True, path_type=Path))
@click.option("--images", "images_dir", type=click.Path(path_type=Path), required=True,
              help="Folder holding the images the annotations name.")
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Folder of the YOLO dataset to write.")
@click.option("--split", type=click.Choice(["train", "val", "test"]), default="train", show_default=True,
              help="Split to write; convert again with --split val into the same --out to add validation images.")
@click.option("--keep-crowd", is_flag=True, help="COCO: keep iscrowd=1 annotations as ordinary boxes (skipped by default).")
@click.option("--keep-difficult", is_flag=True, help="VOC: keep difficult=1 objects (skipped by default).")
@click.option("--symlink", is_flag=True, help="Symlink the images instead of copying them (the default is a copy).")
@_report_errors
def datasets_convert(fmt, annotations, images_dir, out, split, keep_crowd, keep_difficult, symlink):
    """Convert COCO JSON or Pascal VOC XML into a YOLO dataset, then check it.

    COCO: class ids follow the categories in ascending category-id order. VOC:
    class ids follow the object names in alphabetical order. Writes
    OUT/images/SPLIT (copies, or symlinks with --symlink), OUT/labels/SPLIT and
    OUT/data.yaml.

    \b
    Examples:
        detector datasets convert --from coco annotations/instances_val2017.json \\
            --images val2017 --out coco-yolo
        detector datasets convert --from voc VOC2012/Annotations --images VOC2012/JPEGImages --out voc-yolo
    """
    from detector import dataset_check, dataset_convert
    from detector import datasets as ds

    if fmt == "coco":
        result = dataset_convert.from_coco(annotations, images_dir, out, split, keep_crowd=keep_crowd, link=symlink)
    else:
        result = dataset_convert.from_voc(annotations, images_dir, out, split, keep_difficult=keep_difficult,
                                          link=symlink)
    for line in result.lines():
        click.echo(line)
    _show_check(dataset_check.check(ds.load(result.yaml)), as_json=False)


@datasets.command("synth")
@click.option("--images", type=int, default=400, show_default=True, help="Training images (val gets a quarter as many).")
@click.option("--imgsz", type=int, default=128, show_default=True, help="Image side in pixels.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed that fixes every pixel.")
@click.option("--out", type=click.Path(path_type=Path), default=None,
              help="Folder to write. Default: the cache 'detector train' uses for the built-in dataset.")
@_report_errors
def datasets_synth(images, imgsz, seed, out):
    """Generate the built-in shapes dataset (deterministic: same options, same bytes).

    With the defaults this is exactly the dataset 'detector train' uses when no
    --data is given. Writes images/, labels/ and data.yaml.

    \b
    Examples:
        detector datasets synth                         # the cached built-in dataset
        detector datasets synth --images 200 --imgsz 96 --seed 1 --out shapes96
    """
    from detector import runtime, synth

    spec = synth.spec_for(images, imgsz, seed)
    data_yaml = synth.ensure(spec, runtime.datasets_cache()) if out is None else synth.generate_into(spec, out)
    click.echo(f"{spec.train_images} train + {spec.val_images} val images at {imgsz} px: {data_yaml}")


if __name__ == "__main__":  # pragma: no cover
    main()
