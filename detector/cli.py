"""The command line: each command parses options, calls one library function, prints.

Library code raises DetectorError; `_report_errors` is the only place that turns
them into one-line messages with a non-zero exit. Heavy imports (torch,
ultralytics) happen inside commands so `--help` stays instant.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path

import click

from detector import __version__, options, paths
from detector.errors import DetectorError, DiskFull, TrainingInterrupted, is_disk_full


class _Failure(click.ClickException):
    """A DetectorError shown as 'Error: <one line>' with the error's own exit code."""

    def __init__(self, error: DetectorError):
        super().__init__(paths.shown(error))  # a file name that is not UTF-8 must not break the one line
        self.exit_code = error.exit_code


def _report_errors(fn):
    """Turn DetectorError into a one-line ClickException (no traceback)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except DetectorError as e:
            raise _Failure(e) from None
        except KeyboardInterrupt:  # Click would say "Aborted!" and exit 1; an interrupt exits 130 everywhere
            raise _Failure(TrainingInterrupted("interrupted (Ctrl-C)")) from None
        except OSError as e:  # a full disk outside training (run.json, a report): one line, not a traceback
            if not is_disk_full(e):
                raise
            raise _Failure(DiskFull(f"disk full while writing {e.filename or 'output'}; free space and retry")) from None

    return wrapper


class _EchoHandler(logging.Handler):
    """Progress the library logs (the `detector` loggers) printed on the terminal, one message a line."""

    def emit(self, record: logging.LogRecord) -> None:
        click.echo(self.format(record))


def _show_progress(quiet: bool = False) -> None:
    """Print the library's progress messages; quiet (a --json answer) keeps only warnings."""
    logger = logging.getLogger("detector")
    if not any(isinstance(h, _EchoHandler) for h in logger.handlers):
        logger.addHandler(_EchoHandler())
    logger.setLevel(logging.WARNING if quiet else logging.INFO)
    logger.propagate = False


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
    Examples:
        detector train --name demo            # built-in dataset, batch auto: runs/demo/
        detector batch --data data.yaml       # what batch auto would choose, and the epoch arithmetic
        detector sweep --batch 16,32,64       # 16 vs 32 vs 64 with an HTML report
        detector export runs/demo             # ONNX, checked against the .pt
    """
    _show_progress()


@main.command(context_settings={"ignore_unknown_options": False})
@options.use(*options.TRAIN, overrides=True)
@_report_errors
def train(**params):
    """Train a detector and record every iteration and epoch under PROJECT/NAME.

    Any other Ultralytics training argument can follow as KEY=VALUE
    (lr0=0.01 optimizer=AdamW mosaic=0 nbs=32 ...).

    \b
    Examples:
        detector train                                   # built-in dataset, ~3 min on a laptop CPU
        detector train --data ../shared/data/coco128/coco128.yaml --model yolo11n.yaml \\
            --epochs 3 --imgsz 320 --batch 16 --name c128
        detector train --resume runs/c128                # continue after Ctrl-C
        detector train --augment my_pipeline.yaml        # an A.save'd Albumentations pipeline, or: light, heavy
        detector train --model yolo11n.pt --download     # fine-tune COCO-pretrained weights (fetched once)
        detector train --tensorboard --name tb           # + runs/tb/tensorboard/ event files
        detector train --mlflow http://127.0.0.1:5000    # + params, metrics and files in MLflow

    Writes runs/NAME/run.json, iterations.csv, epochs.csv and weights/best.pt.
    """
    from detector.train import run as training

    config = options.train_config(params, command=tuple(_command_line()))
    run_dir = training.run(config)
    click.echo(f"Results: {run_dir}/run.json, iterations.csv, epochs.csv, weights/best.pt")


# ---- datasets: check, convert, synth ----

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
    from detector.data import check as dataset_check

    if as_json:
        import json

        click.echo(json.dumps(result.to_json(), indent=2))
    else:
        click.echo(dataset_check.format_report(result))
        click.echo(f"checked in {result.seconds:.2f} s")
    dataset_check.require_ok(result)


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
    from detector.data import check as dataset_check
    from detector.data import datasets as ds

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
    from detector.data import check as dataset_check
    from detector.data import convert as dataset_convert
    from detector.data import datasets as ds

    result = dataset_convert.convert(fmt, annotations, images_dir, out, split, keep_crowd=keep_crowd,
                                     keep_difficult=keep_difficult, link=symlink)
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
    from detector import runtime
    from detector.data import synth

    spec = synth.spec_for(images, imgsz, seed)
    data_yaml = synth.ensure(spec, runtime.datasets_cache()) if out is None else synth.generate_into(spec, out)
    click.echo(f"{spec.train_images} train + {spec.val_images} val images at {imgsz} px: {data_yaml}")


# ---- augment: Albumentations pipelines, check and preview ----

@main.group()
def augment():
    """Check Albumentations pipelines and preview the batches training will see.

    \b
    Examples:
        detector augment check my_pipeline.yaml --imgsz 640
        detector augment preview --augment heavy --seed 1 --out grid.jpg
    """


@augment.command("check")
@click.argument("pipeline", metavar="FILE|PRESET")
@click.option("--imgsz", type=int, default=640, show_default=True, help="Training image size to check against.")
@_report_errors
def augment_check(pipeline, imgsz):
    """Validate a pipeline (a file A.save wrote, or a preset) exactly as 'detector train --augment' does.

    \b
    Example:
        detector augment check my_pipeline.yaml --imgsz 640
    """
    from detector.augment import pipelines as aug

    click.echo(f"ok: {aug.resolve(pipeline, imgsz).describe()}")


@augment.command("preview")
@options.use("data", "augment")
@click.option("--batch", type=int, default=16, show_default=True, help="Images in the batch.")
@options.use("seed", "imgsz")
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Image file to write (.jpg or .png).")
@click.argument("overrides", nargs=-1, metavar=options.OVERRIDES_METAVAR)
@_report_errors
def augment_preview(data, augment, batch, seed, imgsz, out, overrides):
    """Draw one augmented training batch, exactly as the trainer's loader yields it, as a grid.

    Mosaic, perspective, the Albumentations pipeline, HSV and flips all apply,
    with the same Ultralytics arguments training takes as KEY=VALUE (mosaic=0 ...).
    Boxes are drawn with their class names.

    \b
    Examples:
        detector augment preview --augment light --out grid.jpg
        detector augment preview --data ../shared/data/coco128/coco128.yaml --augment my_pipeline.yaml \\
            --batch 16 --seed 3 --imgsz 640 --out grid.jpg

    Writes OUT: a grid of BATCH tiles of IMGSZ x IMGSZ pixels.
    """
    from detector.augment import preview as pv
    from detector.config import parse_overrides

    req = pv.PreviewRequest(out=out, data=data, augment=augment, batch=batch, seed=seed, imgsz=imgsz,
                            overrides=parse_overrides(overrides))
    shown = pv.preview(req)
    click.echo(f"{shown['pipeline']}")
    click.echo(f"wrote {shown['out']}: {shown['images']} images, {shown['boxes']} boxes, "
               f"{shown['width']}x{shown['height']} px")


# ---- compare and sweep: batch-size comparison reports ----

@main.command()
@click.argument("run_dirs", nargs=-1, required=True, type=click.Path(path_type=Path), metavar="RUN_DIR...")
@click.option("--out", type=click.Path(path_type=Path), default=None,
              help="Folder for report.html, report.md and plots/. Default: the folder that holds the runs.")
@_report_errors
def compare(run_dirs, out):
    """Compare finished or running runs side by side: table, plots, and what kind of comparison it is.

    A sweep folder stands for all the runs inside it. Reads only the run
    folders; runs still training or stopped early are shown as far as they got.

    \b
    Examples:
        detector compare runs/b16 runs/b32 runs/b64 --out runs/compare
        detector compare runs/sweep-b16-32-64

    Writes OUT/report.html (one self-contained file), OUT/report.md and OUT/plots/*.png.
    """
    from detector.report import render

    html = render.compare(run_dirs, out if out is not None else render.default_out(run_dirs))
    click.echo(f"Report: {html} (Markdown: {html.with_name(render.REPORT_MD)}, plots in {html.parent / 'plots'})")


@main.command(context_settings={"ignore_unknown_options": False})
@click.option("--batch", "batches", required=True, help="Batch sizes to compare, comma-separated, e.g. 16,32,64.")
@click.option("--seeds", default="0", show_default=True, help="Seeds per batch size, comma-separated, e.g. 0,1,2.")
@click.option("--semantics", type=click.Choice(["accumulate", "true"]), default="accumulate", show_default=True,
              help="accumulate: Ultralytics' nbs accumulation, each weight update sees nbs (64) images. "
                   "true: nbs = batch, every iteration is a weight update and lr0 follows the batch.")
@click.option("--lr-scaling", type=click.Choice(["linear", "sqrt", "none"]), default=None,
              help="With --semantics true: lr0 x batch/64 (linear), x sqrt(batch/64) (sqrt) or unchanged. "
                   "Default: linear for SGD, sqrt for Adam-type optimizers.")
@click.option("--name", default=None, help="Sweep folder name. Default: sweep-b<batches> (so a re-run continues it).")
@click.option("--backend", type=click.Choice(["local", "ray"]), default="local", show_default=True,
              help="local: the runs one after another here. ray: one Ray task per run, in parallel on this machine's GPUs or on a cluster (pip install 'detector[ray]').")
@click.option("--address", default=None, help="--backend ray: the cluster to join ('auto' or HOST:PORT). Default: start Ray on this machine for the sweep.")
@click.option("--gpus-per-run", type=float, default=None,
              help="--backend ray: GPUs each run reserves. Default: 1 when the cluster has GPUs, else 0.")
@click.option("--cpus-per-run", type=float, default=None,
              help="--backend ray: CPUs each run reserves. Default: 1 with GPUs; without, all CPUs of the smallest node.")
@options.use(*options.SWEEP, overrides=True)
@_report_errors
def sweep(batches, seeds, semantics, lr_scaling, name, backend, address, gpus_per_run, cpus_per_run, **params):
    """Train one run per batch size and seed in one folder, then write the comparison there.

    Runs are PROJECT/NAME/b<batch>-s<seed>. Running the same command again
    skips completed runs and resumes unfinished ones.

    \b
    Examples:
        detector sweep --batch 16,32,64 --epochs 10           # built-in dataset
        detector sweep --batch 16,32,64 --seeds 0,1,2 --semantics true optimizer=SGD \\
            --data data.yaml --epochs 50 --name bs-true
        detector sweep --batch 16,32,64 --seeds 0,1,2 --backend ray --address auto   # on a Ray cluster

    Writes PROJECT/NAME/sweep.json, one run folder per batch and seed, report.html, report.md and plots/.
    """
    from detector.train import sweep as sweeping

    template = options.train_config(params, command=tuple(_command_line()))
    config = sweeping.SweepConfig(
        batches=sweeping.parse_ints(batches, "--batch", minimum=1), seeds=sweeping.parse_ints(seeds, "--seeds"),
        template=template, name=name, semantics=semantics, lr_scaling=lr_scaling,
    )
    ray_flags = {"--address": address, "--gpus-per-run": gpus_per_run, "--cpus-per-run": cpus_per_run}
    if backend == "ray":
        from detector.train import sweep_ray

        ray_options = sweep_ray.RayOptions(address=address, gpus_per_run=gpus_per_run, cpus_per_run=cpus_per_run)
        html = sweep_ray.run(config, ray_options)
    elif given := [flag for flag, value in ray_flags.items() if value is not None]:
        from detector.errors import UsageError

        raise UsageError(f"{given[0]} applies to --backend ray only")
    else:
        html = sweeping.run(config)
    click.echo(f"Report: {html} (Markdown: {html.with_name('report.md')})")


@main.command(name="export")
@click.argument("source", type=click.Path(path_type=Path), metavar="RUN_DIR|WEIGHTS.pt")
@click.option("--format", "fmt", default="onnx", show_default=True,
              help="Ultralytics export format: onnx, torchscript, openvino, engine, coreml, ... "
                   "(formats other than onnx/torchscript need their own package installed).")
@click.option("--imgsz", type=int, default=None, help="Input size, a multiple of 32. Default: the training size.")
@click.option("--half", is_flag=True, help="FP16 weights (ONNX on CPU: converted with onnxruntime's float16 tool).")
@click.option("--dynamic", is_flag=True, help="Dynamic batch and image size (ONNX, TorchScript, OpenVINO, ...).")
@click.option("--simplify/--no-simplify", default=True, show_default=True, help="Slim the ONNX graph with onnxslim.")
@click.option("--opset", type=int, default=None, help="ONNX opset. Default: the newest the installed onnx/torch support.")
@click.option("--out", type=click.Path(path_type=Path), default=None,
              help="Folder for the exported model and export.json. Default: beside the .pt.")
@click.option("--images", default=None, metavar="SOURCE",
              help="Images for the parity check (image, folder or glob). Default: the run's val set.")
@click.option("--parity-images", type=int, default=8, show_default=True, help="How many images the parity check uses.")
@click.option("--conf", type=float, default=0.001, show_default=True,
              help="Parity check: every box at or above this score must be found by both models. Low by default "
                   "so that an early model still has boxes to compare.")
@_report_errors
def export_cmd(source, fmt, imgsz, half, dynamic, simplify, opset, out, images, parity_images, conf):
    """Export trained weights for inference and prove the export detects the same boxes.

    After exporting, the first images of the run's val set go through the .pt and
    the export; the command fails (exit 1) unless every box above --conf has a
    counterpart of the same class with IoU >= 0.9. Nothing is downloaded or
    pip-installed: a format whose package is missing says what to install.

    \b
    Examples:
        detector export runs/shapes                      # runs/shapes/weights/best.onnx + export.json
        detector export runs/shapes/weights/best.pt --format torchscript --imgsz 320
        detector export runs/shapes --dynamic --half --out deploy/

    Writes the exported model and export.json (format, imgsz, opset, file size,
    parity figures, latency) beside it.
    """
    from detector.deploy import export as exporting

    config = exporting.ExportConfig(
        source=source, format=fmt.lower(), imgsz=imgsz, half=half, dynamic=dynamic, simplify=simplify, opset=opset,
        out=out, images=images, parity_images=parity_images, conf=conf,
    )
    exported = exporting.run(config)
    click.echo(f"Exported: {exported} (figures in {exported.parent / 'export.json'})")


@main.command()
@click.argument("weights", type=click.Path(path_type=Path), metavar="WEIGHTS")
@click.argument("source", metavar="SOURCE")
@click.option("--out", type=click.Path(path_type=Path), default=None,
              help="Output folder. Default: predictions/<date>-<time>.")
@click.option("--conf", type=float, default=0.25, show_default=True, help="Keep boxes scoring at least this.")
@click.option("--iou", type=float, default=0.7, show_default=True, help="NMS IoU threshold.")
@click.option("--imgsz", type=int, default=None, help="Input size. Default: the model's (training or export size).")
@click.option("--device", default="cpu", show_default=True, help="cpu, or 0 for the first GPU.")
@click.option("--no-images", is_flag=True, help="Write only predictions.json and .csv, no annotated images.")
@click.option("--coco-gt", type=click.Path(path_type=Path), default=None, metavar="INSTANCES.json",
              help="COCO annotation file: image ids (by file name) and category ids (by name) come from it, "
                   "so pycocotools can score predictions.json.")
@_report_errors
def predict(weights, source, out, conf, iou, imgsz, device, no_images, coco_gt):
    """Detect objects in images with a .pt or an exported model (ONNX, TorchScript, ...).

    SOURCE is an image, a folder (searched recursively) or a quoted glob.
    WEIGHTS is a .pt, an exported model or a run folder (its weights/best.pt).

    \b
    Examples:
        detector predict runs/shapes/weights/best.onnx photos/ --out preds
        detector predict runs/shapes 'photos/**/*.jpg' --conf 0.5
        detector predict runs/c128 val2017/ --conf 0.001 --coco-gt instances_val2017.json

    Writes OUT/predictions.json (COCO results: file_name, category_id,
    category_name, bbox [x, y, w, h] in pixels, score), OUT/predictions.csv and
    OUT/images/ (annotated copies).
    """
    from detector.deploy import predict as predicting

    config = predicting.PredictConfig(weights=weights, source=source, out=out, conf=conf, iou=iou, imgsz=imgsz,
                                      device=device, save_images=not no_images, coco_gt=coco_gt)
    predicting.run(config)


@main.command(name="val")
@click.argument("source", type=click.Path(path_type=Path), metavar="RUN_DIR|WEIGHTS.pt")
@click.option("--data", type=click.Path(path_type=Path), default=None,
              help="YOLO data YAML whose val split is scored. Default: the run folder's data.yaml.")
@click.option("--coco-gt", type=click.Path(path_type=Path), default=None, metavar="INSTANCES.json",
              help="COCO annotation file of the val images: adds COCO's 12 metrics (needs detector[coco]).")
@click.option("--imgsz", type=int, default=None, help="Input size. Default: the training size.")
@click.option("--batch", type=int, default=16, show_default=True, help="Images per validation batch.")
@click.option("--device", default="cpu", show_default=True, help="cpu, or 0 for the first GPU.")
@click.option("--json", "as_json", is_flag=True, help="Print every figure as one JSON object.")
@_report_errors
def val_cmd(source, data, coco_gt, imgsz, batch, device, as_json):
    """Score weights on a val split: Ultralytics' mAP and, with --coco-gt, COCO's 12 metrics beside it.

    Ultralytics' figures are those epochs.csv records. With --coco-gt the val
    images the annotation file lists are predicted at conf 0.001 and scored by
    pycocotools, ids matched by file name and category name.

    \b
    Examples:
        detector val runs/c128                                   # the run's own data.yaml
        detector val runs/c128/weights/best.pt --data ../shared/data/coco128/coco128.yaml \\
            --coco-gt instances.json

    Writes nothing; prints both sets of figures (or JSON with --json).
    """
    from detector.deploy import val as validating

    config = validating.ValConfig(source=source, data=data, coco_gt=coco_gt, imgsz=imgsz, batch=batch, device=device)
    _show_progress(quiet=as_json)
    result = validating.run(config)
    if as_json:
        import json

        click.echo(json.dumps(result, indent=2))
    else:
        for line in validating.format_report(result):
            click.echo(line)


# ---- weights: the pretrained weights cache ----

@main.group()
def weights():
    """Show and fill the pretrained weights cache ($DETECTOR_HOME/weights), e.g. before going offline.

    \b
    Examples:
        detector weights fetch yolo11n.pt
        detector weights list
    """


@weights.command("list")
@_report_errors
def weights_list():
    """List the cached weights with size, sha256 and where each came from.

    \b
    Example:
        detector weights list
    """
    from detector.weights import cache

    found = cache.listing()
    if not found:
        click.echo(f"weights cache {cache.cache_dir()} is empty; fill it with: detector weights fetch yolo11n.pt")
    for w in found:
        click.echo(f"{w['name']}  {w['size'] / 2**20:.1f} MB  sha256 {w['sha256'][:16]}  "
                   f"{w['url'] or 'copied in by hand'}")


@weights.command("fetch")
@click.argument("name")
@click.option("--force", is_flag=True, help="Download again even if the cache has it.")
@_report_errors
def weights_fetch(name, force):
    """Download Ultralytics weights NAME into the cache (from DETECTOR_WEIGHTS_URL/NAME when set).

    The file is written to a temporary name and renamed only when complete, its
    size checked against what the server announced; Ctrl-C leaves nothing.

    \b
    Examples:
        detector weights fetch yolo11n.pt
        DETECTOR_WEIGHTS_URL=http://mirror.local/weights detector weights fetch yolov8s.pt
    """
    from detector.weights import cache

    got = cache.fetch_once(name, force=force)
    state = "downloaded" if got["downloaded"] else "already cached"
    click.echo(f"{got['path']} ({state}, {got['size'] / 2**20:.1f} MB, sha256 {got['sha256']})")


# ---- tensorboard: event files from a run's records ----

@main.command(name="tensorboard")
@click.argument("run_dirs", nargs=-1, required=True, type=click.Path(path_type=Path), metavar="RUN_DIR...")
@_report_errors
def tensorboard_cmd(run_dirs):
    """Write TensorBoard event files for runs trained without --tensorboard (or rewrite them).

    Every iteration's and epoch's recorded values (iterations.csv, epochs.csv)
    become scalars, the run's configuration becomes HParams. A sweep folder
    stands for the runs inside it. Needs detector[tensorboard]; offline.

    \b
    Examples:
        detector tensorboard runs/demo
        detector tensorboard runs/sweep-b16-32-64 && tensorboard --logdir runs

    Writes RUN_DIR/tensorboard/ (replacing what was there).
    """
    from detector.record import runs, tensorboard

    found = runs.find(run_dirs)
    for run_dir in found:
        runs.load(run_dir)  # every folder checked before any is written
    for run_dir in found:
        done = tensorboard.write(run_dir)
        click.echo(f"{done['path']}: {done['iterations']} iterations, {done['epochs']} epochs")


# ---- batch: the --batch auto decision as a dry run ----

@main.command(name="batch", context_settings={"ignore_unknown_options": False})
@options.use("data", "model", "imgsz", "device", "batch.candidates", "batch.safety")
@click.option("--gpu-memory", default=None, metavar="GB[,GB...]",
              help="Plan for GPUs of these sizes without one: the memory model predicts each candidate's peak.")
@click.option("--classes", type=int, default=None, help="With --gpu-memory: number of classes (instead of the dataset's).")
@click.option("--boxes-per-image", type=int, default=None,
              help="With --gpu-memory: boxes on the densest image (instead of the dataset's); x4 with mosaic.")
@click.option("--json", "as_json", is_flag=True, help="With --gpu-memory: print one JSON object.")
@click.argument("overrides", nargs=-1, metavar=options.OVERRIDES_METAVAR)
@_report_errors
def batch_cmd(gpu_memory, classes, boxes_per_image, as_json, **params):
    """Show which batch `detector train --batch auto` would use, and what each candidate means (no training).

    On a GPU it builds the real model at the real image size and measures the
    peak memory of real training steps (with the dataset's densest image's boxes
    x4 for mosaic) and of the validation pass at twice the batch, for each
    candidate from the smallest up, stopping at the first that does not fit; it
    picks the largest whose peak fits --batch-safety of the GPU's memory. With
    --device 0,1 each GPU gets the candidate and Ultralytics the total.
    On CPU 'auto' means 16 and nothing is probed. Either way it prints, per
    candidate, iterations per epoch ceil(N/B) and optimizer steps per epoch under
    Ultralytics' gradient accumulation (nbs=64 unless given as KEY=VALUE, e.g. nbs=16).

    \b
    Examples:
        detector batch                                   # the built-in dataset
        detector batch --data ../shared/data/coco128/coco128.yaml --imgsz 640 --model yolo11s.yaml
        detector batch --data data.yaml --device 0,1 --batch-candidates 8,16,32 mosaic=0
        detector batch --gpu-memory 8,16,24,40,80 --imgsz 640 --classes 3 --boxes-per-image 10 --json

    With --gpu-memory no GPU is needed: a memory model runs the real training
    steps on shapes only and predicts peak reserved GiB (README, "Planning for
    a GPU you do not have"). Writes no run folder; `detector train` records the
    same table in run.json's `batch`.
    """
    from detector.train import autobatch

    config = options.train_config(params)
    if gpu_memory is None:
        if classes is not None or boxes_per_image is not None or as_json:
            raise DetectorError("--classes, --boxes-per-image and --json go with --gpu-memory, e.g. --gpu-memory 24")
        autobatch.dry_run(config)
        return
    import json

    from detector.train import gpuplan

    sizes = gpuplan.parse_gpu_sizes(gpu_memory)
    gpuplan.check_counts(classes, boxes_per_image)
    _show_progress(quiet=as_json)
    result = gpuplan.plan(config, sizes, classes, boxes_per_image)
    click.echo(json.dumps(result.to_json(), indent=1) if as_json else gpuplan.describe(result))


if __name__ == "__main__":  # pragma: no cover
    main()
