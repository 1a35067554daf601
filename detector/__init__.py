"""detector: train YOLO object detectors with Ultralytics and make batch size a choice you understand.

The Python API (detector.api) is reachable from here, loaded on first use so that
`import detector` and `detector --help` stay fast: detector.train(...),
detector.resume, detector.sweep, detector.compare, detector.plan, detector.export,
detector.predict, detector.open_run.
"""

import importlib

__version__ = "0.1.0"

# The API's names, declared without a value so that the first use goes through __getattr__ below,
# which loads detector.api (and with it numpy, click, ...) only then.
train: "object"
resume: "object"
sweep: "object"
compare: "object"
plan: "object"
export: "object"
predict: "object"
open_run: "object"
Run: "object"
Report: "object"
Sweep: "object"
_API = ("train", "resume", "sweep", "compare", "plan", "export", "predict", "open_run", "Run", "Report", "Sweep")


def __getattr__(name: str):
    # `detector.train` is also the package detector/train/: once imported, Python binds the package to that
    # name, and the package is callable (detector/train/__init__.py) so that detector.train(...) still trains.
    if name in _API:
        return getattr(importlib.import_module("detector.api"), name)
    raise AttributeError(f"module 'detector' has no attribute {name!r}")


def __dir__():
    return sorted([*globals(), *_API])
