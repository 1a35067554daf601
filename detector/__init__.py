"""detector: train YOLO object detectors with Ultralytics and make batch size a choice you understand."""

__version__ = "0.1.0"
