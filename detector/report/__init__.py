"""Comparison reports rebuilt from run folders alone: analysis, plots, HTML and Markdown."""
