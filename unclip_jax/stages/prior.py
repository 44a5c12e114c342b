"""The diffusion prior stage: caption -> CLIP image embedding (DALL-E 2 §2.1).

A causal transformer (models/prior.py) over [caption token encodings, z_t, timestep,
noised z_i, query] predicts the clean z_i ('x0' parameterisation) with an MSE loss on
a 1000-step cosine schedule. The caption is replaced by learned null embeddings 10% of
the time, for classifier-free guidance. Sampling is DDIM over a respaced schedule;
N candidates are drawn per caption and the one with the highest z_i . z_t is kept.

The stage trains on frozen CLIP outputs computed once into an embedding cache
(embedding_cache.py); images are never seen after that. The model, its loss and the
one-call sampler are the generator's (`generators.prior.Prior`).
"""
import dataclasses
import functools
import logging

import jax
import numpy as np

from unclip_jax import xla_options
from unclip_jax.data import pipeline
from unclip_jax.errors import ConfigError
from unclip_jax.generators import prior as prior_lib
from unclip_jax.generators.base import (IMAGE_EMBEDDING, TEXT_EMBEDDING,
                                        TEXT_ENCODINGS, TEXT_MASK)
from unclip_jax.generators.clip import FrozenClip
from unclip_jax.models.clip import l2_normalize_host
from unclip_jax.parallel.local import map_batches
from unclip_jax.stages import embedding_cache, frozen
from unclip_jax.stages.base import GeneratorStage

log = logging.getLogger(__name__)

MODEL_INPUTS = (IMAGE_EMBEDDING, TEXT_EMBEDDING, TEXT_ENCODINGS, TEXT_MASK)


def cosine_similarity(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  """Row-wise cosine of [N, D] x2 -> [N]."""
  return np.sum(l2_normalize_host(a) * l2_normalize_host(b), axis=-1)


def sample_metrics(sampled: np.ndarray, true: np.ndarray) -> dict[str, float]:
  """How close sampled z_i [N, D] are to the true ones [N, D] of their captions.

  prior_cos: mean cosine to the caption's own image embedding; prior_cos_shuffled: to
  another caption's (a fixed derangement: the chance level); prior_top1: how often the
  sample's nearest image embedding among all N is its own.
  """
  assert sampled.shape == true.shape, (sampled.shape, true.shape)
  shuffled = np.roll(np.arange(len(true)), 1)
  similarity = l2_normalize_host(sampled) @ l2_normalize_host(true).T
  return {
      "eval/prior_cos": float(np.mean(cosine_similarity(sampled, true))),
      "eval/prior_cos_shuffled": float(np.mean(cosine_similarity(sampled,
                                                                 true[shuffled]))),
      "eval/prior_top1": float(np.mean(similarity.argmax(axis=1)
                                       == np.arange(len(true)))),
  }


class PriorStage(GeneratorStage):
  """Trains the diffusion prior on a frozen CLIP's cached outputs."""

  reads_clip = True

  def validate(self):
    c = self.config
    # The cache feeds the prior's own data through the CLIP: it must be the CLIP's.
    frozen.check_clip_workdir(c, same_data=("name", "resolution", "num_emoji", "seed"))
    prior_lib.validate_config(c)
    if c.eval.num_examples < 2:
      raise ConfigError("eval.num_examples must be >= 2")

  def prepare(self):
    c = self.config
    self.clip = FrozenClip(c.clip_workdir, step=c.get("clip_step"))
    self.train_cache, self.eval_cache = (
        embedding_cache.build_or_load(
            self.workdir, split, pipeline.get_data_source(c.data, split), self.clip,
            batch_size=c.cache_batch_size)
        for split in (c.data.train_split, c.data.eval_split))
    mean, std = (np.asarray(s).tolist()
                 for s in self.train_cache.image_embedding_stats)
    frozen.record_frozen_clip(self.workdir, self.clip, image_embedding_mean=mean,
                              image_embedding_std=std)
    self.build(dataclasses.replace(self.clip.sizes, image_embedding_mean=tuple(mean),
                                   image_embedding_std=tuple(std)))
    context = self.generator.model.context_length
    for cache in (self.train_cache, self.eval_cache):
      if cache.manifest["max_tokens"] > context:
        log.warning("%s captions have up to %d tokens; the prior reads the first %d "
                    "(model.text_context) and z_t", cache.name,
                    cache.manifest["max_tokens"], context)
    if len(self.eval_cache) < c.eval.num_examples:
      raise ConfigError(
          f"the {c.data.eval_split!r} split has {len(self.eval_cache)} examples, "
          f"fewer than eval.num_examples={c.eval.num_examples}; lower it")

  def train_iterator(self):
    # Only the model's inputs are gathered: each batch is one read per field.
    return pipeline.make_train_iterator(
        self.train_cache.select(MODEL_INPUTS), global_batch_size=self.config.batch_size,
        seed=self.config.seed)

  @functools.cached_property
  def _eval_losses(self):
    return xla_options.jit(lambda params, batch, rng: self.generator.losses(
        params, batch, rng, train=False)[0])

  def eval_examples(self) -> list[int]:
    """A fixed random subset of the held-out cache: the sampled captions, and the
    retrieval gallery."""
    order = np.random.default_rng(0).permutation(len(self.eval_cache))
    return sorted(order[:self.config.eval.num_examples].tolist())

  @functools.cached_property
  def _held_out(self) -> tuple[dict, dict]:
    """(examples for eval/loss, examples sampled), read from the cache once."""
    count = min(self.config.eval.loss_examples, len(self.eval_cache))
    return (self.eval_cache.arrays(range(count), MODEL_INPUTS),
            self.eval_cache.arrays(self.eval_examples(), MODEL_INPUTS))

  def evaluate(self, params, step):
    c = self.config
    loss_examples, examples = self._held_out
    # The same t, noise and x_T at every evaluation: curves are not sampling noise.
    loss_rng, sample_rng = jax.random.split(jax.random.key(c.seed + 1))
    size = c.eval.batch_size
    # Gamma for sampler='analytic' (the paper preset's), before its samples.
    self.record_eps_moments(params, step, lambda: loss_examples)
    losses = map_batches(lambda batch, start: self._eval_losses(
        params, batch, jax.random.fold_in(loss_rng, start)), loss_examples, size)
    sampled = map_batches(lambda batch, start: self.generator.sample(
        params, batch, jax.random.fold_in(sample_rng, start)), examples, size)
    metrics = sample_metrics(sampled, examples[IMAGE_EMBEDDING])
    metrics["eval/loss"] = float(np.mean(losses))
    # What z_t itself scores in place of a sample: the prior should beat it.
    metrics["eval/text_embedding_cos"] = float(np.mean(cosine_similarity(
        examples[TEXT_EMBEDDING], examples[IMAGE_EMBEDDING])))
    return metrics
