"""The run folder (the run-directory contract): `writer` writes it during training, `reader` reads it back."""
