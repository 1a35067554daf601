"""Datasets: the YOLO data spec, checks, conversion from COCO/VOC, the built-in synthetic set, image sources."""
