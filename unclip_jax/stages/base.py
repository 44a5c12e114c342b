"""What a stage contributes to the one trainer loop, and nothing more.

The loop (unclip_jax/train/loop.py) owns the mesh, sharded init, the jitted
step, EMA, checkpoints, metrics and progress. A stage owns its model, its loss,
its batch preparation and its evaluation.
"""
import abc
from typing import Any, Iterator, Mapping

import jax
import ml_collections
import numpy as np

Batch = Mapping[str, np.ndarray]


class Stage(abc.ABC):
  """One trainable stage of the unCLIP stack."""

  def __init__(self, config: ml_collections.ConfigDict, workdir: str):
    self.config = config
    self.workdir = workdir

  def validate(self) -> None:
    """Raises ConfigError for stage-specific bad values, before compiling."""

  def prepare(self) -> None:
    """One-time set-up before the model exists: tokenizer, frozen caches."""

  @abc.abstractmethod
  def init_params(self, rng: jax.Array) -> Any:
    """Params boxed with logical axis names (traced under jax.eval_shape)."""

  @abc.abstractmethod
  def loss(self, params: Any, batch: Batch, rng: jax.Array
           ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Scalar loss and metrics (named without prefix) for a GLOBAL batch."""

  @abc.abstractmethod
  def train_iterator(self) -> Iterator[Batch]:
    """Host-local batches of numpy arrays; has get_state()/set_state()."""

  def evaluate(self, params: Any, step: int) -> dict[str, float]:
    """Metrics named 'eval/...' computed with the EMA params."""
    del params, step
    return {}

  def write_samples(self, params: Any, step: int) -> None:
    """Generative stages write a PNG grid to workdir/samples/. Called in
    every process: whatever runs on the params runs in all of them; only
    process 0 writes."""
    del params, step
