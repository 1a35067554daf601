"""Comparison reports rebuilt from run folders alone.

render.compare is the entry point: comparison (with analysis, timing, recommend) works out what the runs say,
plots draws the figures, sections lays the report out as a list of document blocks, emit writes them as
Markdown and HTML.
"""
