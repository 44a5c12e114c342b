"""The upsampler stage: trains one upsampler of the cascade on full-resolution
images (DALL-E 2 §2, App. C). The model, its loss (degradation and random crops
inside the jitted step) and its sampler are the generator's
(`generators.upsampler.Upsampler`); this module reads the data, evaluates PSNR
against bilinear upsampling and writes sample grids.
"""
import functools
import logging
import os

import jax
import ml_collections
import numpy as np

from unclip_jax import xla_options
from unclip_jax.data import pipeline
from unclip_jax.data.images import nearest_upscale, to_uint8, write_grid
from unclip_jax.data.preprocess import center_crop_and_resize
from unclip_jax.errors import ConfigError
from unclip_jax.generators import upsampler as upsampler_lib
from unclip_jax.generators.base import LOW_RES
from unclip_jax.parallel import distributed
from unclip_jax.parallel.local import map_batches
from unclip_jax.stages.base import GeneratorStage

log = logging.getLogger(__name__)

def psnr(images: np.ndarray, reference: np.ndarray,
         max_db: float = 100.0) -> np.ndarray:
  """Per-image PSNR in dB of uint8 images [N, H, W, C] against `reference`
  (identical images give `max_db`)."""
  error = (np.asarray(images, np.float64) - np.asarray(reference, np.float64))**2
  mse = error.reshape(len(error), -1).mean(axis=1)
  return np.minimum(10 * np.log10(255.0**2 / np.maximum(mse, 1e-30)), max_db)


def validate_eval_config(config: ml_collections.ConfigDict) -> None:
  e = config.eval
  if min(e.loss_examples, e.num_examples, e.batch_size, e.num_samples) < 1:
    raise ConfigError("eval.loss_examples, eval.num_examples, eval.batch_size "
                      "and eval.num_samples must be >= 1")
  if e.num_samples > e.num_examples:
    raise ConfigError(f"eval.num_samples={e.num_samples} must be <= "
                      f"eval.num_examples={e.num_examples}")


class UpsamplerStage(GeneratorStage):
  """Trains one upsampler of the cascade on full-resolution images."""

  def validate(self):
    upsampler_lib.validate_config(self.config)
    validate_eval_config(self.config)

  def prepare(self):
    c = self.config
    self.train_source = pipeline.get_data_source(c.data, c.data.train_split)
    self.eval_source = pipeline.get_data_source(c.data, c.data.eval_split)
    if len(self.eval_source) < c.eval.num_examples:
      raise ConfigError(
          f"the {c.data.eval_split!r} split has {len(self.eval_source)} images, "
          f"fewer than eval.num_examples={c.eval.num_examples}; lower it")
    self.build(None)
    self._evaluated = None  # (step, images) of the last evaluation

  def _preprocess(self, record):
    image = np.asarray(record[pipeline.IMAGE])
    side = self.config.data.resolution
    if image.shape != (side, side, 3):  # datasets other than the bundled ones
      image = center_crop_and_resize(side)(record)[pipeline.IMAGE]
    return {pipeline.IMAGE: image}

  def train_iterator(self):
    return pipeline.make_train_iterator(
        self.train_source, global_batch_size=self.config.batch_size,
        seed=self.config.seed, preprocess=self._preprocess)

  @functools.cached_property
  def _eval_losses(self):
    return xla_options.jit(lambda params, images, rng: self.generator.losses(
        params, {pipeline.IMAGE: images}, rng, train=False)[0])

  @functools.cached_property
  def _degrade(self):
    return xla_options.jit(self.generator.degrade)

  def eval_examples(self) -> list[int]:
    """A fixed random subset of the held-out split: the images upsampled."""
    order = np.random.default_rng(0).permutation(len(self.eval_source))
    return sorted(order[:self.config.eval.num_examples].tolist())

  def _eval_images(self, indices) -> np.ndarray:
    return pipeline.stack_records([pipeline.to_model_inputs(
        self.eval_source[i], self._preprocess) for i in indices])[pipeline.IMAGE]

  def _upsampled(self, params, step: int) -> dict[str, np.ndarray]:
    """Held-out truth, its low-res input, the model's and the bilinear
    upsampling, as uint8 [N, ...]; computed once per step (evaluate and
    write_samples share them)."""
    if self._evaluated is not None and self._evaluated[0] == step:
      return self._evaluated[1]
    c = self.config
    rng = jax.random.key(c.seed + 1)  # the same inputs and noise every time
    truth = self._eval_images(self.eval_examples())

    def upsample(batch, start):
      low_res = self._degrade(jax.random.fold_in(rng, start), batch["truth"])
      sample = self.generator.sample(
          params, {LOW_RES: low_res},
          jax.random.fold_in(jax.random.fold_in(rng, start), 1))
      return {"low_res": low_res, "sample": sample,
              "bilinear": upsampler_lib.bilinear_upsample(low_res,
                                                          self.generator.factor)}
    out = map_batches(upsample, {"truth": truth}, c.eval.batch_size)
    images = {k: to_uint8(v) for k, v in out.items()}
    images["truth"] = to_uint8(truth)
    self._evaluated = (step, images)
    return images

  def evaluate(self, params, step):
    c = self.config
    rng = jax.random.key(c.seed + 2)
    losses, weights = [], []
    for index, batch in enumerate(pipeline.eval_batches(
        self.eval_source, batch_size=c.eval.batch_size,
        preprocess=self._preprocess, limit=c.eval.loss_examples)):
      per_example = self._eval_losses(params, batch[pipeline.IMAGE],
                                      jax.random.fold_in(rng, index))
      losses.append(distributed.to_host(per_example))
      weights.append(batch["mask"])
    # Gamma for sampler='analytic', on held-out images, before the samples.
    self.record_eps_moments(params, step, lambda: {
        pipeline.IMAGE: self._eval_images(self.eval_examples())})
    images = self._upsampled(params, step)
    return {
        "eval/loss": float(np.average(np.concatenate(losses),
                                      weights=np.concatenate(weights))),
        "eval/psnr": float(np.mean(psnr(images["sample"],
                                                         images["truth"]))),
        "eval/psnr_bilinear": float(np.mean(psnr(
            images["bilinear"], images["truth"]))),
    }

  def write_samples(self, params, step):
    """workdir/samples/step_<N>.png: a row per held-out image, columns
    low-res (nearest-upscaled) | bilinear | sample | truth."""
    images = self._upsampled(params, step)  # on every host: it may compute
    if jax.process_index() != 0:
      return
    count = self.config.eval.num_samples
    low_res = nearest_upscale(images["low_res"][:count], self.generator.factor)
    tiles = np.stack([low_res, images["bilinear"][:count],
                      images["sample"][:count], images["truth"][:count]], axis=1)
    path = os.path.join(self.workdir, "samples", f"step_{step}.png")
    write_grid(path, tiles.reshape((-1,) + tiles.shape[2:]), rows=count,
                    cols=4)
    log.info("wrote %s", path)
