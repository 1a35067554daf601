"""The comparison report: report.html (self-contained), report.md and PNG plots from run folders alone.

`compare(run_dirs, out_dir)` is what `detector compare` and `detector sweep`
call. It reads the runs and works out what they say (report.comparison, on
report.analysis, report.timing and report.recommend), draws (report.plots), lays
the report out as one list of sections (report.sections, report.document) and
writes that list twice (report.emit: Markdown and HTML).
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from detector import fileio, paths
from detector.errors import RunDirError
from detector.record import runs
from detector.report import emit, plots, sections
from detector.report.comparison import Comparison, analyse, load_runs

__all__ = ["REPORT_HTML", "REPORT_MD", "PLOTS_DIR", "Comparison", "analyse", "compare", "default_out", "load_runs"]

REPORT_HTML, REPORT_MD, PLOTS_DIR = "report.html", "report.md", "plots"


def default_out(run_dirs) -> Path:
    """Where a report goes when --out is not given: a sweep folder itself, else the folder holding the runs."""
    dirs = [Path(p).expanduser().resolve() for p in run_dirs]
    if len(dirs) == 1 and dirs[0].is_dir() and not (dirs[0] / runs.RUN_JSON).exists():
        return dirs[0]
    common = Path(os.path.commonpath([d.parent for d in dirs]))
    if common == Path(common.anchor) or common == Path.home().resolve():  # runs in unrelated folders
        return Path.cwd() / "compare"
    return common


def compare(run_dirs, out_dir: str | Path) -> Path:
    """Write report.html, report.md and plots/*.png comparing run_dirs into out_dir; return report.html.

    Everything is drawn and written into a staging folder first and moved into out_dir
    only once complete (detector.fileio.filling): a kill or a full disk leaves the
    previous report whole, and a folder this call created is removed again.
    """
    paths.check_writes([out_dir], what="--out")  # never inside a dataset or a run folder
    comp = analyse(load_runs(run_dirs))
    out = Path(out_dir).expanduser().resolve()
    new = not out.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise RunDirError(f"cannot create report folder {out}: {e.strerror}; pass a writable --out") from e
    try:
        with fileio.filling(out) as stage:
            plot_dir = stage / PLOTS_DIR
            plot_dir.mkdir()
            comp.figures = plots.draw(comp.runs, comp.rows, plot_dir)
            doc = sections.build(comp)
            fileio.write_text(stage / REPORT_MD, emit.markdown(doc, stage))
            fileio.write_text(stage / REPORT_HTML, emit.html(doc))
    except BaseException:
        if new:
            with contextlib.suppress(OSError):
                out.rmdir()  # only if empty: this call made it and wrote nothing into it
        raise
    return out / REPORT_HTML
