"""Pretrained weights: the local cache ($DETECTOR_HOME/weights) and the one download a user asks for."""
