"""The decoder stage: CLIP image embedding z_i (+ caption) -> base image (DALL-E 2 §2).

The model, its loss and its guided sampler are the generator's
(`generators.decoder.Decoder`); the training data pairs each image with a frozen
CLIP's cached z_i and caption tokens by index (`paired_images.PairedSource`). This
module is the stage the trainer loop runs: config checks, data, evaluation,
sample grids.
"""
import functools
import logging
import os
from typing import Sequence

import jax
import ml_collections
import numpy as np

from unclip_jax import xla_options
from unclip_jax.data import pipeline
from unclip_jax.data.images import resize_image, to_uint8
from unclip_jax.errors import ConfigError
from unclip_jax.generators import decoder as decoder_lib
from unclip_jax.generators.base import IMAGE_EMBEDDING, TOKENS
from unclip_jax.generators.clip import FrozenClip
from unclip_jax.parallel import distributed
from unclip_jax.parallel.local import map_batches
from unclip_jax.stages import decoder_eval, embedding_cache, frozen
from unclip_jax.stages.base import GeneratorStage
from unclip_jax.stages.paired_images import PairedSource, SquareImages

log = logging.getLogger(__name__)

IMAGE, CAPTION = pipeline.IMAGE, pipeline.CAPTION
MODEL_INPUTS = (IMAGE, IMAGE_EMBEDDING, TOKENS)


def validate_eval_config(config: ml_collections.ConfigDict) -> None:
  e = config.eval
  for name in ("loss_examples", "num_examples", "batch_size", "num_samples",
               "samples_per_caption"):
    if e[name] < 1:
      raise ConfigError(f"eval.{name}={e[name]} must be >= 1")


class DecoderStage(GeneratorStage):
  """Trains the decoder on images and a frozen CLIP's cached image embeddings."""

  reads_clip = True

  def validate(self):
    frozen.check_clip_workdir(self.config, same_data=("name", "seed"))
    decoder_lib.validate_config(self.config)
    validate_eval_config(self.config)

  def prepare(self):
    c = self.config
    self.clip = FrozenClip(c.clip_workdir, step=c.get("clip_step"))
    frozen.record_frozen_clip(self.workdir, self.clip)
    # z_i is computed from images at the CLIP's resolution, whatever the decoder's.
    data_at_clip = ml_collections.ConfigDict(c.data.to_dict())
    data_at_clip.resolution = self.clip.resolution
    self.sources = {}
    for split in (c.data.train_split, c.data.eval_split):
      images = SquareImages(pipeline.get_data_source(data_at_clip, split),
                            self.clip.resolution)
      cache = embedding_cache.build_or_load(self.workdir, split, images, self.clip,
                                            batch_size=c.cache_batch_size)
      self.sources[split] = PairedSource(images, cache)
    self.train_source = self.sources[c.data.train_split]
    self.eval_source = self.sources[c.data.eval_split]
    self.build(self.clip.sizes)
    for source in (self.train_source, self.eval_source):
      longest = source.cache.manifest["max_tokens"]
      if longest > self.generator.context_length:
        log.warning("%s captions have up to %d tokens; the decoder reads the first %d "
                    "(model.text_context)", source.cache.name, longest,
                    self.generator.context_length)
    needed = max(c.eval.num_examples, c.eval.num_samples)
    if len(self.eval_source) < needed:
      raise ConfigError(
          f"the {c.data.eval_split!r} split has {len(self.eval_source)} examples, "
          f"fewer than eval.num_examples / eval.num_samples = {needed}; lower them")

  def _model_inputs(self, record):
    return {IMAGE: resize_image(record[IMAGE], self.config.data.resolution),
            IMAGE_EMBEDDING: record[IMAGE_EMBEDDING], TOKENS: record[TOKENS]}

  def train_iterator(self):
    return pipeline.make_train_iterator(
        self.train_source, global_batch_size=self.config.batch_size,
        seed=self.config.seed, preprocess=self._model_inputs)

  @functools.cached_property
  def _eval_losses(self):
    def losses(params, batch, rng):
      per_example, aux = self.generator.losses(params, batch, rng, train=False)
      return {"loss": per_example, **{k: aux[k] for k in ("mse", "vlb") if k in aux}}
    return xla_options.jit(losses)

  def eval_examples(self) -> list[int]:
    """A fixed random subset of the held-out split; the first eval.num_samples are
    the captions of the samples grid."""
    order = np.random.default_rng(0).permutation(len(self.eval_source))
    count = max(self.config.eval.num_examples, self.config.eval.num_samples)
    return order[:count].tolist()

  def held_out(self, indices: Sequence[int]) -> dict[str, np.ndarray]:
    """Held-out records `indices` stacked: `image` uint8 at the decoder's
    resolution, `image_embedding`, `tokens`, `caption` and any integer labels."""
    records = self.eval_source.__getitems__(list(indices))
    side = self.config.data.resolution
    return pipeline.stack_records([
        {**{k: v for k, v in r.items() if k != IMAGE and (
            k in (IMAGE_EMBEDDING, TOKENS, CAPTION) or np.ndim(v) == 0
            and np.issubdtype(np.asarray(v).dtype, np.integer))},
         IMAGE: resize_image(r[IMAGE], side)} for r in records])

  def _sample_all(self, params, arrays: dict, rng: jax.Array) -> np.ndarray:
    """uint8 [N, R, R, 3] samples for arrays of z_i and tokens, in eval batches."""
    def sample(batch, start):
      return self.generator.sample(params, batch, jax.random.fold_in(rng, start))
    condition = {k: arrays[k] for k in (IMAGE_EMBEDDING, TOKENS)}
    return to_uint8(map_batches(sample, condition, self.config.eval.batch_size))

  @functools.cached_property
  def _templates(self) -> decoder_eval.SceneTemplates | None:
    return decoder_eval.SceneTemplates.from_sources(
        [s.images for s in self.sources.values()],
        functools.partial(resize_image, side=self.config.data.resolution))

  def evaluate(self, params, step):
    c = self.config
    rng = jax.random.key(c.seed + 1)  # the same t, noise and x_T at every evaluation
    sums, count = {}, 0.0
    for index, batch in enumerate(pipeline.eval_batches(
        self.eval_source, batch_size=c.eval.batch_size,
        preprocess=self._model_inputs, limit=c.eval.loss_examples)):
      mask = batch.pop("mask")
      out = distributed.to_host(self._eval_losses(
          params, {k: batch[k] for k in MODEL_INPUTS}, jax.random.fold_in(rng, index)))
      for name, values in out.items():
        sums[name] = sums.get(name, 0.0) + float(np.sum(np.asarray(values)[mask]))
      count += float(mask.sum())
    metrics = {f"eval/{name}": total / count for name, total in sums.items()}

    examples = self.held_out(self.eval_examples()[:c.eval.num_examples])
    # Gamma for sampler='analytic', on the same examples, before the samples.
    self.record_eps_moments(params, step, lambda: {
        IMAGE: examples[IMAGE].astype(np.float32) / 127.5 - 1.0,
        IMAGE_EMBEDDING: examples[IMAGE_EMBEDDING], TOKENS: examples[TOKENS]})
    samples = self._sample_all(params, examples, jax.random.fold_in(rng, 1 << 20))
    metrics.update(self._clip_agreement(samples, examples))
    metrics.update(self._clip_agreement(examples[IMAGE], examples, "_truth"))
    if self._templates is not None:
      metrics.update(self._templates.accuracies(samples, examples))
    return metrics

  def _clip_agreement(self, images, examples, suffix=""):
    """CLIP's view of decoder-resolution images, resized to its own resolution."""
    side = self.clip.resolution
    return decoder_eval.clip_agreement(
        self.clip, np.stack([resize_image(x, side) for x in images]),
        examples[IMAGE_EMBEDDING], suffix)

  def write_samples(self, params, step):
    """workdir/samples/step_<N>.png: a row per fixed held-out caption,
    eval.samples_per_caption samples, then the true image."""
    e = self.config.eval
    examples = self.held_out(self.eval_examples()[:e.num_samples])
    repeated = {k: np.repeat(v, e.samples_per_caption, axis=0)
                for k, v in examples.items()}
    # Every host samples (the params span them all); process 0 writes.
    samples = self._sample_all(params, repeated,
                               jax.random.key(self.config.seed + 3))
    if jax.process_index() != 0:
      return
    path = os.path.join(self.workdir, "samples", f"step_{step}.png")
    decoder_eval.write_sample_grid(path, samples, examples[IMAGE],
                                   list(examples[CAPTION]))
    log.info("wrote %s", path)
