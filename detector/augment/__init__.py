"""Albumentations pipelines (files and presets), their checks, and previews of augmented batches."""
