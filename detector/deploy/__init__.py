"""Trained weights to deployable models: export, the parity check, and predict."""
