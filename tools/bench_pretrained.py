"""Benchmark: what a starting checkpoint buys (fine-tune against from-scratch, same epochs).

1. Pretrain on dataset A (generated shapes, seed 0, the built-in demo's
   settings), or take an existing run's best.pt with --pretrained.
2. Serve that best.pt as `yolo11n.pt` from a loopback HTTP server and let
   `detector train --model yolo11n.pt --download` fetch it into an empty weights
   cache (DETECTOR_WEIGHTS_URL), exactly as a user's first download.
3. Train on dataset B (other shapes, other seed, fewer images) for the same
   epochs twice: from yolo11n.yaml and from the downloaded weights.
4. Score the fine-tuned run with `detector val --coco-gt` (a COCO file written
   from B's val labels): Ultralytics' mAP and COCO's side by side.

    python tools/bench_pretrained.py                        # about 8 minutes on a quiet 2-core CPU
    python tools/bench_pretrained.py --pretrained runs/demo/weights/best.pt --epochs 5
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import subprocess
import sys
import tempfile
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import cv2
import yaml

DETECTOR = str(Path(sys.executable).with_name("detector"))
# The built-in dataset's demo settings (detector.config.BUILTIN_OVERRIDES), for B too.
SETTINGS = ["nbs=16", "optimizer=AdamW", "lr0=0.002", "warmup_epochs=1", "mosaic=0", "plots=False"]


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pretrained", type=Path, default=None, help="a best.pt to start from (default: train on A)")
    ap.add_argument("--pretrain-images", type=int, default=200, help="training images of A")
    ap.add_argument("--pretrain-epochs", type=int, default=10, help="epochs on A")
    ap.add_argument("--epochs", type=int, default=5, help="epochs on B, both ways")
    ap.add_argument("--images", type=int, default=120, help="training images of B")
    ap.add_argument("--seed", type=int, default=7, help="seed of B (A is the built-in seed 0)")
    ap.add_argument("--out", type=Path, default=None, help="folder for runs and results (default: a temp folder)")
    return ap.parse_args()


def detector(*args: str, env: dict) -> str:
    done = subprocess.run([DETECTOR, *args], env=env, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"detector {' '.join(args)} failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    return done.stdout


def synth(images: int, seed: int, folder: Path, env: dict) -> Path:
    printed = detector("datasets", "synth", "--images", str(images), "--imgsz", "128", "--seed", str(seed),
                       "--out", str(folder), env=env)
    return Path(printed.rsplit(": ", 1)[-1].strip())


class _Quiet(SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def serve(folder: Path) -> tuple[ThreadingHTTPServer, str]:
    handler = functools.partial(_Quiet, directory=str(folder))
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}"


def coco_gt(data_yaml: Path, out: Path) -> Path:
    """A COCO instances file for the val split of a YOLO dataset (ids unrelated to list positions)."""
    data = yaml.safe_load(data_yaml.read_text())
    root = Path(data["path"])
    images, annotations = [], []
    for n, image in enumerate(sorted((root / data["val"]).glob("*.png")) + sorted((root / data["val"]).glob("*.jpg"))):
        h, w = cv2.imread(str(image)).shape[:2]
        images.append({"id": 1000 + n, "file_name": image.name, "width": w, "height": h})
        label = root / "labels" / "val" / f"{image.stem}.txt"
        for line in filter(str.strip, label.read_text().splitlines() if label.exists() else []):
            c, x, y, bw, bh = map(float, line.split())
            box = [(x - bw / 2) * w, (y - bh / 2) * h, bw * w, bh * h]
            annotations.append({"id": len(annotations) + 1, "image_id": 1000 + n, "bbox": box, "iscrowd": 0,
                                "area": box[2] * box[3], "category_id": 10 + int(c)})
    categories = [{"id": 10 + int(i), "name": name} for i, name in data["names"].items()]
    out.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    return out


def best(run_dir: Path) -> dict:
    final = json.loads((run_dir / "run.json").read_text()).get("final") or {}
    return {"map50": final.get("map50"), "map50_95": final.get("map50_95")}


def main():
    args = parse_args()
    out = args.out or Path(tempfile.mkdtemp(prefix="bench-pretrained-"))
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "DETECTOR_HOME": str(out / "home")}  # an empty weights cache
    runs = out / "runs"
    pretrained = args.pretrained
    if pretrained is None:
        print(f"pretraining on A ({args.pretrain_images} images, {args.pretrain_epochs} epochs)...", flush=True)
        data_a = synth(args.pretrain_images, 0, out / "A", env)
        detector("train", "--data", str(data_a), "--epochs", str(args.pretrain_epochs), "--imgsz", "128", "--batch",
                 "16", "--project", str(runs), "--name", "A", *SETTINGS, env=env)
        pretrained = runs / "A" / "weights" / "best.pt"
    served = out / "served"
    served.mkdir(exist_ok=True)
    (served / "yolo11n.pt").write_bytes(Path(pretrained).read_bytes())
    server, url = serve(served)
    data_b = synth(args.images, args.seed, out / "B", env)
    common = ["--data", str(data_b), "--epochs", str(args.epochs), "--imgsz", "128", "--batch", "16", "--project",
              str(runs), *SETTINGS]
    print(f"B: {args.images} images, seed {args.seed}, {args.epochs} epochs from yolo11n.yaml...", flush=True)
    detector("train", "--model", "yolo11n.yaml", "--name", "B-scratch", *common, env=env)
    print("... and from the downloaded yolo11n.pt", flush=True)
    detector("train", "--model", "yolo11n.pt", "--download", "--name", "B-finetune", *common,
             env={**env, "DETECTOR_WEIGHTS_URL": url})
    server.shutdown()
    val = detector("val", str(runs / "B-finetune"), "--coco-gt", str(coco_gt(data_b, out / "B-instances.json")),
                   env=env)
    result = {"scratch": best(runs / "B-scratch"), "finetune": best(runs / "B-finetune"),
              "weights": json.loads((runs / "B-finetune" / "run.json").read_text())["config"]["weights"]}
    print(json.dumps(result, indent=2))
    print(val)
    (out / "result.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
