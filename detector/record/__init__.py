"""The run folder (the run-directory contract): `writer` writes it during training, `runs` reads it back."""
