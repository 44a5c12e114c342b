"""The decoder stage: CLIP image embedding z_i (+ caption) -> base image (DALL-E 2 §2).

The model, its loss and its guided sampler are `decoder_model.Decoder`; the
training data pairs each image with a frozen CLIP's cached z_i and caption tokens
by index (`paired_images.PairedSource`). This module is the stage the trainer loop
runs (config checks, data, evaluation, sample grids) and `load_decoder`, which
the sampling pipeline uses.
"""
import functools
import logging
import os
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from unclip_jax import diffusion
from unclip_jax.data import pipeline
from unclip_jax.errors import ConfigError
from unclip_jax.parallel import distributed
from unclip_jax.sample import grid
from unclip_jax.stages import decoder_eval, diffusion_common, embedding_cache, frozen
from unclip_jax.stages.base import Stage
from unclip_jax.stages.decoder_model import Decoder
from unclip_jax.stages.embedding_cache import IMAGE_EMBEDDING, TOKENS
from unclip_jax.stages.paired_images import PairedSource, SquareImages, resize_image

log = logging.getLogger(__name__)

IMAGE, CAPTION = pipeline.IMAGE, pipeline.CAPTION
MODEL_INPUTS = (IMAGE, IMAGE_EMBEDDING, TOKENS)


def _check_unet(config: ml_collections.ConfigDict) -> None:
  m, side = config.model, config.data.resolution
  levels = len(m.channel_mults)
  if side % 2**(levels - 1):
    raise ConfigError(f"data.resolution={side} is not divisible by {2**(levels - 1)}, "
                      f"which a UNet with {levels} levels (model.channel_mults) needs")
  sides = {side // 2**level: level for level in range(levels)}
  unknown = [s for s in m.attention_resolutions if s not in sides]
  if unknown:
    raise ConfigError(f"model.attention_resolutions {list(unknown)} are not "
                      f"feature-map sides {sorted(sides)} of a {side} px UNet; pick "
                      "from those")
  attended = {sides[s] for s in m.attention_resolutions}
  if attended:
    attended.add(levels - 1)  # the middle block's attention
  for level, mult in enumerate(m.channel_mults):
    width = m.base_channels * mult
    if width % m.norm_groups:
      raise ConfigError(f"model.norm_groups={m.norm_groups} does not divide the width "
                        f"base_channels x {mult} = {width}")
    if level in attended and width % m.head_channels:
      raise ConfigError(f"model.head_channels={m.head_channels} does not divide the "
                        f"width {width} of an attention level")
  if m.text_depth < 1:
    raise ConfigError(f"model.text_depth={m.text_depth}: the decoder reads the caption "
                      "through its own text transformer; use >= 1")
  if m.text_width % m.text_heads:
    raise ConfigError(f"model.text_width={m.text_width} does not divide into "
                      f"model.text_heads={m.text_heads} heads")
  if m.get("text_context") is not None and m.text_context < 1:
    raise ConfigError(f"model.text_context={m.text_context} must be >= 1 (or unset)")


def validate_config(config: ml_collections.ConfigDict) -> None:
  """One-line ConfigError for a decoder config that cannot work (CLIP not read)."""
  m = config.model
  _check_unet(config)
  for name in ("image_embedding_drop_prob", "text_drop_prob", "dropout"):
    if not 0.0 <= m[name] < 1.0:
      raise ConfigError(f"model.{name}={m[name]}: must be in [0, 1)")
  if m.parameterization not in diffusion.PARAMETERIZATIONS:
    raise ConfigError(f"model.parameterization={m.parameterization!r}: use one of "
                      f"{tuple(diffusion.PARAMETERIZATIONS)}")
  if m.vlb_weight < 0:
    raise ConfigError(f"model.vlb_weight={m.vlb_weight} must be >= 0")
  # diffusion_common checks `diffusion.parameterization`; ours lives in `model`.
  view = ml_collections.ConfigDict({
      "diffusion": {**config.diffusion.to_dict(),
                    "parameterization": m.parameterization},
      "sample": config.sample.to_dict()})
  diffusion_common.validate_diffusion_config(view)
  e = config.eval
  for name in ("loss_examples", "num_examples", "batch_size", "num_samples",
               "samples_per_caption"):
    if e[name] < 1:
      raise ConfigError(f"eval.{name}={e[name]} must be >= 1")


class DecoderStage(Stage):
  """Trains the decoder on images and a frozen CLIP's cached image embeddings."""

  def validate(self):
    frozen.check_clip_workdir(self.config, same_data=("name", "seed"))
    validate_config(self.config)

  def prepare(self):
    c = self.config
    self.clip = frozen.FrozenClip(c.clip_workdir, step=c.get("clip_step"))
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
    self.decoder = Decoder(c, image_embedding_dim=self.clip.embed_dim,
                           vocab_size=self.clip.vocab_size,
                           context_length=self.clip.context_length)
    for source in (self.train_source, self.eval_source):
      longest = source.cache.manifest["max_tokens"]
      if longest > self.decoder.context_length:
        log.warning("%s captions have up to %d tokens; the decoder reads the first %d "
                    "(model.text_context)", source.cache.name, longest,
                    self.decoder.context_length)
    needed = max(c.eval.num_examples, c.eval.num_samples)
    if len(self.eval_source) < needed:
      raise ConfigError(
          f"the {c.data.eval_split!r} split has {len(self.eval_source)} examples, "
          f"fewer than eval.num_examples / eval.num_samples = {needed}; lower them")

  def _model_inputs(self, record):
    return {IMAGE: resize_image(record[IMAGE], self.config.data.resolution),
            IMAGE_EMBEDDING: record[IMAGE_EMBEDDING], TOKENS: record[TOKENS]}

  def init_params(self, rng):
    return self.decoder.init_params(rng)

  def loss(self, params, batch, rng):
    per_example, aux = self.decoder.losses(params, batch, rng)
    metrics = {k: v.astype(jnp.float32).mean() for k, v in aux.items()}
    return per_example.mean(), metrics

  def train_iterator(self):
    return pipeline.make_train_iterator(
        self.train_source, global_batch_size=self.config.batch_size,
        seed=self.config.seed, preprocess=self._model_inputs)

  @functools.cached_property
  def _eval_losses(self):
    def losses(params, batch, rng):
      per_example, aux = self.decoder.losses(params, batch, rng, train=False)
      return {"loss": per_example, **{k: aux[k] for k in ("mse", "vlb") if k in aux}}
    return jax.jit(losses)

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
      return self.decoder.sample(params, batch[IMAGE_EMBEDDING], batch[TOKENS],
                                 jax.random.fold_in(rng, start))
    condition = {k: arrays[k] for k in (IMAGE_EMBEDDING, TOKENS)}
    return grid.to_uint8(diffusion_common.map_batches(
        sample, condition, self.config.eval.batch_size))

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


class TrainedDecoder(NamedTuple):
  config: ml_collections.ConfigDict
  decoder: Decoder
  params: Any  # EMA params
  step: int
  clip_fingerprint: str  # FrozenClip.fingerprint of the CLIP it was trained on


def load_decoder(workdir: str, step: int | None = None,
                 sharding: Any = None) -> TrainedDecoder:
  """A trained decoder from its workdir alone: (config, Decoder, EMA params, step,
  clip_fingerprint).

  Sample with `decoder.sample(params, z_i, tokens, rng)`: z_i [B, D] from the CLIP in
  `config.clip_workdir` (or the prior), tokens from that CLIP's tokenizer
  (`FrozenClip.tokenize`); compare `clip_fingerprint` with `FrozenClip.fingerprint`
  to catch a CLIP retrained since.
  """
  config, params, step = frozen.load_trained(workdir, "decoder", step, sharding)
  clip = frozen.read_frozen_clip(workdir, "decoder")
  decoder = Decoder(config, image_embedding_dim=clip["embed_dim"],
                    vocab_size=clip["vocab_size"],
                    context_length=clip["context_length"])
  return TrainedDecoder(config, decoder, params, step, clip["fingerprint"])
