"""detector's training pipeline: Ultralytics' v8 augmentation, same draws, fewer pixel passes.

Ultralytics builds a 2s x 2s mosaic canvas (a 4.9 MB fill and copy at imgsz 640),
warps it into the s x s output with cv2.warpAffine, converts to HSV and back with a
three-channel LUT, flips with a strided view that Format then copies, and wraps every
step in label objects. Measured per stage in docs/benchmarks.md ("Twice stock, and when the GPU starves").

Here each mosaic tile goes straight into the output: with Ultralytics' default
affine (scale and translate only) the tile's visible part is one cv2.resize into its
own rectangle of the output, with the tile placement and the random affine composed
into one mapping; rotation, shear or perspective fall back to the canvas and one warp.
HSV uses the same gains and tables (hue by lookup, saturation and value by one SIMD
multiply-add each); flips are cv2.flip in place; the CHW tensor is written by one
split; in a worker the batch is stacked straight into shared memory. Random numbers are drawn
from the same generators in the same order as Ultralytics' pipeline, so with one
seed both loaders make the same layouts, matrices, flips and boxes
(tests/test_fastload.py holds the two to the same distribution).
"""

from __future__ import annotations

import random

import cv2
import numpy as np
import torch

from detector.yolo.fastload import geometry
from detector.yolo.fastload.geometry import Tile

FILL = 114  # Ultralytics' padding grey


class FastTrainPipeline:
    """Callable per dataset index: the augmented sample as Ultralytics' Format returns it."""

    def __init__(self, dataset, imgsz: int, hyp):
        from ultralytics.data.augment import Albumentations

        self.dataset, self.s, self.hyp = dataset, imgsz, hyp
        self.mosaic_p = float(hyp.mosaic)
        # the user's Albumentations pipeline, run by Ultralytics' own step (the same object the stock loader runs)
        self.albumentations_step = Albumentations(p=1.0, transforms=getattr(hyp, "augmentations", None))
        self.gains = (float(hyp.hsv_h), float(hyp.hsv_s), float(hyp.hsv_v))
        self._flat = None  # whether the Albumentations step can be skipped when none of its transforms fires
        self._buffers: dict[str, np.ndarray] = {}  # per-process scratch images, reused sample after sample

    def __call__(self, index: int, into: torch.Tensor | None = None) -> dict:
        """The sample of a dataset index; into: a (3, s, s) uint8 tensor (a batch's slot) to write the image to."""
        ds = self.dataset
        img, hw0, hw = ds.load_image(index)
        label = ds.labels[index]
        out = {"im_file": label["im_file"], "ori_shape": hw0, "resized_shape": (self.s, self.s),
               "ratio_pad": (hw[0] / hw0[0], hw[1] / hw0[1])}
        img, boxes, cls = self.place(img, hw, label)
        random.uniform(0, 1), random.uniform(0, 1)  # MixUp and CutMix at p=0 draw once each and do nothing
        img, boxes, cls = self.albumentations(img, boxes, cls)
        self.hsv(img)
        img, boxes = self.flip(img, boxes)
        return {**out, **self.format(img, boxes, cls, into)}

    # -- stages (tools/bench_stages.py times each) ---------------------------------------------------------------------

    def place(self, img: np.ndarray, hw: tuple[int, int], label: dict):
        """Mosaic (with its probability) and the random affine: the s x s output image, pixel xyxy boxes, classes."""
        s = self.s
        if random.uniform(0, 1) > self.mosaic_p:  # Ultralytics' Mosaic draws this even at p=0
            tiles = [Tile(img, (0, 0, hw[1], hw[0]), (0, 0, hw[1], hw[0]))]
            boxes, cls = geometry.tile_boxes(label, hw, (0, 0))
            canvas = (hw[1], hw[0])
        else:
            tiles, boxes, cls = self._mosaic_tiles(img, hw, label)
            canvas = (2 * s, 2 * s)
        m, gain = geometry.draw_affine(canvas, (s, s), self.hyp)
        out = self._render(tiles, canvas, m)
        boxes, keep = geometry.warp_boxes(boxes, m, gain, (s, s), bool(self.hyp.perspective))
        return out, boxes[keep], cls[keep]

    def albumentations(self, img: np.ndarray, boxes: np.ndarray, cls: np.ndarray):
        """Ultralytics' Albumentations step, as the stock pipeline calls it (same probability draw, same seed)."""
        step = self.albumentations_step
        if step.transform is None:
            return img, boxes, cls
        done = self._pixel_step(step, img)
        if done is not None:
            return done, boxes, cls
        if not step.contains_spatial:  # a pixel-only pipeline reads and writes the image alone
            return step({"img": img})["img"], boxes, cls
        from ultralytics.utils.instance import Instances

        labels = {"img": img, "cls": cls.reshape(-1, 1),
                  "instances": Instances(boxes, np.zeros((0, 1000, 2), np.float32), None, bbox_format="xyxy",
                                         normalized=False)}
        labels = step(labels)
        img = labels["img"]
        inst = labels["instances"]
        inst.convert_bbox("xyxy")
        inst.denormalize(img.shape[1], img.shape[0])
        return img, inst.bboxes, labels["cls"]

    def _pixel_step(self, step, img: np.ndarray) -> np.ndarray | None:
        """The step's result on a pixel-only pipeline, drawn as the step draws it but without Compose; None otherwise.

        Ultralytics' default set is four pixel transforms at p=0.01 each, so 96% of samples pass through it
        unchanged, yet Albumentations' Compose still checks and copies the data (0.15 ms per image at 640).
        The draws are the step's: Python's random, then (seeded as the step seeds it, per process) the
        Compose's own generator once, then each transform's own generator for whether it fires and, when it
        does, for its parameters. Each transform has its own generators, so calling the ones that fire
        afterwards, in order, draws exactly what Compose would.
        """
        if self._flat is None:
            self._flat = _flat_pixel_pipeline(step)
        if not self._flat:
            return None
        if random.random() >= step.p:  # the step's own draw: it returns the sample untouched
            return img
        compose = step.transform
        if compose.seed != torch.initial_seed():  # what the step does first, in each worker process
            compose.set_random_seed(torch.initial_seed())
        if not compose.py_random.random() < compose.p:
            return img
        fired = [t for t in compose.transforms if t.p >= 1 or (t.p > 0 and t.py_random.random() < t.p)]
        for t in fired:  # their should_apply already drawn: forced, they draw only their parameters
            img = t(image=img, force_apply=True)["image"]
        return img

    def hsv(self, img: np.ndarray) -> None:
        """Ultralytics' random HSV gains, the same tables, applied in place one plane at a time."""
        hg, sg, vg = self.gains
        if img.shape[-1] != 3 or not (hg or sg or vg):
            return
        r = np.random.uniform(-1, 1, 3) * [hg, sg, vg]
        hue = ((np.arange(0, 256, dtype=r.dtype) + r[0] * 180) % 180).astype(np.uint8)
        # into scratch buffers: fresh 1.2 MB arrays per sample cost page faults once the heap is trimmed
        hsv = cv2.cvtColor(img, cv2.COLOR_BGR2HSV, dst=self._scratch("hsv", img.shape))
        h, s, v = planes = [self._scratch(name, img.shape[:2]) for name in ("h", "s", "v")]
        cv2.split(hsv, planes)
        cv2.LUT(h, hue, dst=h)
        # Ultralytics' saturation and value tables are x * gain, clipped and truncated: the same as one SIMD
        # multiply-add rounding x * gain - 0.5 (3.5x faster than cv2.LUT, which has no vector path); x=0 stays 0
        cv2.convertScaleAbs(s, dst=s, alpha=r[1] + 1, beta=-0.5)
        cv2.convertScaleAbs(v, dst=v, alpha=r[2] + 1, beta=-0.5)
        cv2.cvtColor(cv2.merge(planes, dst=hsv), cv2.COLOR_HSV2BGR, dst=img)

    def flip(self, img: np.ndarray, boxes: np.ndarray):
        """Vertical then horizontal flip, each with its probability (both drawn, as Ultralytics draws them)."""
        h, w = img.shape[:2]
        for p, code, lo, hi, size in ((self.hyp.flipud, 0, 1, 3, h), (self.hyp.fliplr, 1, 0, 2, w)):
            if random.random() < p:
                img = cv2.flip(img, code, dst=img) if img.flags.writeable else cv2.flip(img, code)
                boxes = boxes.copy()
                boxes[:, [lo, hi]] = size - boxes[:, [hi, lo]]
        return img, boxes

    def format(self, img: np.ndarray, boxes: np.ndarray, cls: np.ndarray, into: torch.Tensor | None = None) -> dict:
        """Ultralytics' Format: CHW tensor (RGB unless the bgr draw says otherwise), normalized xywh boxes."""
        h, w = img.shape[:2]
        if into is None:
            into = torch.empty((3, h, w), dtype=torch.uint8)
        chw = into.numpy()
        rgb = random.uniform(0, 1) > self.hyp.bgr
        cv2.split(img, [chw[2], chw[1], chw[0]] if rgb else [chw[0], chw[1], chw[2]])  # CHW in one pass
        n = len(boxes)
        xywh = np.empty((n, 4), np.float32)
        xywh[:, 0] = (boxes[:, 0] + boxes[:, 2]) / (2 * w)
        xywh[:, 1] = (boxes[:, 1] + boxes[:, 3]) / (2 * h)
        xywh[:, 2] = (boxes[:, 2] - boxes[:, 0]) / w
        xywh[:, 3] = (boxes[:, 3] - boxes[:, 1]) / h
        return {"img": into, "cls": torch.from_numpy(np.asarray(cls, np.float32).reshape(-1, 1)),
                "bboxes": torch.from_numpy(xywh), "batch_idx": torch.zeros(n)}

    # -- mosaic and rendering ------------------------------------------------------------------------------------------

    def _mosaic_tiles(self, img: np.ndarray, hw: tuple[int, int], label: dict):
        """The four tiles (this image and three more, chosen as Ultralytics' Mosaic chooses them) and their boxes."""
        ds = self.dataset
        if ds.cache != "ram":  # Ultralytics draws the others from its buffer of recently loaded images
            others = random.choices(list(ds.buffer), k=3)
        else:
            others = [random.randint(0, len(ds) - 1) for _ in range(3)]
        images = [(img, hw, label)]
        for j in others:
            im, _, hwj = ds.load_image(j)
            images.append((im, hwj, ds.labels[j]))
        layout = geometry.mosaic_layout([x[1] for x in images], self.s)
        tiles, boxes, cls = [], [], []
        for (im, hwj, lab), (crop, at) in zip(images, layout):
            tiles.append(Tile(im, crop, at))
            b, c = geometry.tile_boxes(lab, hwj, (at[0] - crop[0], at[1] - crop[1]))
            boxes.append(b)
            cls.append(c)
        return tiles, *geometry.clip_to_canvas(np.concatenate(boxes), np.concatenate(cls), 2 * self.s)

    def _render(self, tiles: list[Tile], canvas: tuple[int, int], m: np.ndarray) -> np.ndarray:
        """The output image: each tile resized straight into place, or (rotation, shear, perspective) one warp."""
        s = self.s
        if geometry.is_axis_aligned(m):
            out = self._scratch("out", (s, s, 3))  # handed on as the sample's image until format copies it out
            out[...] = FILL
            for tile in tiles:
                where = geometry.resize_rect(m, tile, (s, s))
                if where is None:
                    continue
                (sx0, sx1), (sy0, sy1) = where[0]
                (dx0, dx1), (dy0, dy1) = where[1]
                cv2.resize(tile.img[sy0:sy1, sx0:sx1], (dx1 - dx0, dy1 - dy0), dst=out[dy0:dy1, dx0:dx1],
                           interpolation=cv2.INTER_LINEAR)
            return out
        full = self._scratch("canvas", (canvas[1], canvas[0], 3))
        full[...] = FILL
        for t in tiles:
            full[t.at[1]:t.at[3], t.at[0]:t.at[2]] = t.img[t.crop[1]:t.crop[3], t.crop[0]:t.crop[2]]
        border = (FILL, FILL, FILL)
        if self.hyp.perspective:
            return cv2.warpPerspective(full, m, dsize=(s, s), dst=self._scratch("out", (s, s, 3)), borderValue=border)
        return cv2.warpAffine(full, m[:2], dsize=(s, s), dst=self._scratch("out", (s, s, 3)), borderValue=border)

    def _scratch(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
        """This process's reusable uint8 buffer of that name and shape."""
        buf = self._buffers.get(name)
        if buf is None or buf.shape != shape:
            buf = self._buffers[name] = np.empty(shape, np.uint8)
        return buf


def _flat_pixel_pipeline(step) -> bool:
    """True for a plain Compose of pixel-only transforms that decide with Albumentations' own should_apply."""
    import albumentations as A
    from albumentations.core.transforms_interface import BasicTransform

    compose = step.transform
    return (type(compose) is A.Compose and not step.contains_spatial and hasattr(compose, "py_random")
            and all(isinstance(t, BasicTransform) and type(t).should_apply is BasicTransform.should_apply
                    and type(t).__call__ is BasicTransform.__call__ for t in compose.transforms))
