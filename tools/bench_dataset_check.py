"""Time `detector datasets check`: a full check and a cached one, on coco128 and on the built-in dataset.

Usage: .venv/bin/python tools/bench_dataset_check.py [DATA.yaml ...]
Runs in a private DETECTOR_HOME, so the user's cache is untouched. The first
full check reads the files from disk (or the page cache); later ones are warm.
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COCO128 = ROOT.parent / "shared" / "data" / "coco128" / "coco128.yaml"


def _time(fn, repeat: int) -> list[float]:
    out = []
    for _ in range(repeat):
        started = time.perf_counter()
        fn()
        out.append(time.perf_counter() - started)
    return out


def bench(yaml_path: Path, repeat: int = 5) -> None:
    """Print full-check and cached-check times (dataset load included) for one data YAML."""
    from detector.data import check as dataset_check
    from detector.data import datasets

    full = _time(lambda: dataset_check.check(datasets.load(yaml_path)), repeat)
    dataset_check.cached_check(datasets.load(yaml_path))  # fill the cache
    cached = _time(lambda: dataset_check.cached_check(datasets.load(yaml_path)), repeat)
    info = datasets.load(yaml_path)
    images = len({p for paths in info.splits.values() for p in paths})
    print(f"{yaml_path}: {images} image files; full check first {full[0]:.2f} s, median "
          f"{statistics.median(full):.2f} s; cached median {statistics.median(cached) * 1000:.0f} ms")


def main(argv: list[str]) -> None:
    with tempfile.TemporaryDirectory(prefix="bench-check-") as home:
        os.environ["DETECTOR_HOME"] = home
        from detector import runtime
        from detector.data import synth

        targets = [Path(a) for a in argv] or [p for p in (COCO128,) if p.exists()]
        if not argv:
            targets.append(synth.ensure(synth.SynthSpec(seed=0), runtime.datasets_cache()))
        for t in targets:
            bench(t)


if __name__ == "__main__":
    main(sys.argv[1:])
