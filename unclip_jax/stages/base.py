"""What a stage contributes to the one trainer loop, and nothing more.

The loop (unclip_jax/train/loop.py) owns the mesh, sharded init, the jitted
step, EMA, checkpoints, metrics and progress. A stage owns its model, its loss,
its batch preparation and its evaluation. A generative stage's model, loss and
sampler are its generator's (unclip_jax/generators/): `GeneratorStage` adapts
one to training.
"""
import abc
import functools
import logging
from typing import Any, Callable, Iterator, Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from unclip_jax import generators, xla_options
from unclip_jax.generators import common
from unclip_jax.generators.base import ClipSizes, EpsMoments
from unclip_jax.parallel import distributed

log = logging.getLogger(__name__)

Batch = Mapping[str, np.ndarray]


class Stage(abc.ABC):
  """One trainable stage of the unCLIP stack."""

  def __init__(self, config: ml_collections.ConfigDict, workdir: str):
    self.config = config
    self.workdir = workdir

  # Whether the stage reads a trained CLIP (`config.clip_workdir`): then `build`
  # needs its sizes.
  reads_clip = False

  def validate(self) -> None:
    """Raises ConfigError for stage-specific bad values, before compiling."""

  @abc.abstractmethod
  def build(self, clip_sizes: ClipSizes | None) -> None:
    """Builds the model from the config (and the CLIP's sizes) alone: no data is
    read. What `prepare` ends with, and all that ahead-of-time compilation
    needs."""

  def prepare(self) -> None:
    """One-time set-up from data (tokenizer, frozen caches); then `build`."""
    self.build(None)

  @abc.abstractmethod
  def abstract_batch(self) -> dict[str, jax.ShapeDtypeStruct]:
    """The GLOBAL training batch as the data pipeline delivers it (after
    `build`): what the train step is compiled for."""

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


class GeneratorStage(Stage):
  """A stage whose model is a generator: init, loss and batch are its."""

  generator: generators.Generator

  def build(self, clip_sizes):
    generator_class = generators.generator_class(self.config.stage, self.config)
    self.generator = generator_class.from_config(self.config, clip_sizes)

  def abstract_batch(self):
    return self.generator.abstract_batch(self.config.batch_size)

  def init_params(self, rng):
    return self.generator.init_params(rng)

  def loss(self, params, batch, rng):
    per_example, aux = self.generator.losses(params, batch, rng)
    return per_example.mean(), {k: v.astype(jnp.float32).mean()
                                for k, v in aux.items()}

  @functools.cached_property
  def _eps_moments_fn(self):
    return xla_options.jit(functools.partial(
        self.generator.estimate_eps_moments,
        grid_size=self.config.sample.moments_timesteps))

  def record_eps_moments(self, params: Any, step: int,
                         examples: Callable[[], Mapping[str, np.ndarray]]
                         ) -> EpsMoments | None:
    """Analytic-DPM's Gamma of the EMA params at `sample.moments_timesteps`
    original timesteps, on the first `sample.moments_examples` held-out
    `examples()` (model inputs [N, ...]); call it before the evaluation samples.

    At the last step (the loop evaluates there) it is written to
    workdir/eps_moments.json for `generators.load`. When the config samples with
    'analytic' it is estimated at every evaluation too, for that evaluation's
    samples. Every process computes (the params span them); process 0 writes.
    """
    last = step == self.config.total_steps
    s = self.config.sample
    if not last and s.get("sampler") != "analytic":
      return None
    examples = examples()
    count = min(s.moments_examples, len(next(iter(examples.values()))))
    size = min(count, self.config.eval.batch_size)
    # Whole batches only: the mean of equal-sized batches' means is the mean.
    batches = count // size
    rng = jax.random.key(self.config.seed + 4)
    gammas = [np.asarray(distributed.to_host(self._eps_moments_fn(
        params, {k: v[i * size:(i + 1) * size] for k, v in examples.items()},
        jax.random.fold_in(rng, i)))) for i in range(batches)]
    moments = EpsMoments(
        timesteps=tuple(common.moments_grid(self.config.diffusion.num_timesteps,
                                            s.moments_timesteps).tolist()),
        values=tuple(np.mean(gammas, axis=0).tolist()), step=step,
        num_examples=batches * size)
    self.generator.eps_moments = moments
    if last and jax.process_index() == 0:
      log.info("wrote %s", moments.write(self.workdir))
    return moments
