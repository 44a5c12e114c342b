"""Checkpoints: the orbax manager the trainer saves with, and reading a finished
stage's workdir (config, steps, EMA params)."""
