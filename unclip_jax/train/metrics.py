"""Metrics: `metrics.jsonl` (one JSON object per line) and TensorBoard events."""
import json
import os
import time
from typing import Mapping

import jax
import numpy as np


def _plain(value):
  value = np.asarray(value)
  return value.item() if value.size == 1 else value.tolist()


class MetricWriter:
  """Only process 0 writes; other hosts get a writer that does nothing."""

  def __init__(self, workdir: str):
    self._enabled = jax.process_index() == 0
    self._path = os.path.join(workdir, "metrics.jsonl")
    self._tb = None
    if self._enabled:
      from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
      self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

  def write(self, step: int, metrics: Mapping[str, object]) -> None:
    if not self._enabled or not metrics:
      return
    row = {"step": int(step), "time": time.time()}
    row.update({k: _plain(v) for k, v in metrics.items()})
    with open(self._path, "a") as f:
      f.write(json.dumps(row) + "\n")
    for name, value in row.items():
      if name not in ("step", "time") and isinstance(value, (int, float)):
        self._tb.add_scalar(name, value, int(step))
    self._tb.flush()

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()


def read_metrics(workdir: str) -> list[dict]:
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]
