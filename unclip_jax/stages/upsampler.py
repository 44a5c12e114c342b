"""The upsampler stage: low-res image -> high-res image (DALL-E 2 §2, App. C).

A convolution-only UNet (no attention, no text, no z_i) sees the noisy high-res
image concatenated with the bilinearly upsampled low-res image. Training makes
the low-res image inside the jitted loss from the full-resolution batch: the
configured degradation ('blur' for the 64->256 stage, 'bsr' for 256->1024),
optional gaussian noise on it, bilinear upsampling back to full size, then one
random crop of `crop_fraction` of the side, at the same place in the target and
in the upsampled low-res image. Every random choice comes from the step's rng,
so the loader only delivers full images. Because the network has only
convolutions, the params trained on crops run on the full image when sampling
(DDIM over a respaced schedule, one compiled call).

`Upsampler` (loss and sampler) and `load_upsampler` are what the sampling
pipeline reuses.
"""
import functools
import logging
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from unclip_jax.data import degradations, pipeline
from unclip_jax.data.preprocess import center_crop_and_resize
from unclip_jax.errors import ConfigError
from unclip_jax.models.unet import UNet
from unclip_jax.parallel import distributed
from unclip_jax.sample import grid
from unclip_jax.stages import diffusion_common, frozen
from unclip_jax.stages.base import Stage

log = logging.getLogger(__name__)

DEGRADATIONS = ("blur", "bsr")


def upsampling_factor(config: ml_collections.ConfigDict) -> int:
  return config.data.resolution // config.model.low_res


def crop_size(config: ml_collections.ConfigDict) -> int:
  """Side of the training crops, in high-res pixels."""
  return int(round(config.model.crop_fraction * config.data.resolution))


def validate_config(config: ml_collections.ConfigDict) -> None:
  """One-line ConfigError for an upsampler config that cannot work."""
  m, resolution = config.model, config.data.resolution
  if m.low_res < 1 or resolution % m.low_res or resolution // m.low_res < 2:
    raise ConfigError(
        f"data.resolution={resolution} (output side) is not an integer multiple "
        f">= 2 of model.low_res={m.low_res} (input side); set "
        f"--config.model.low_res to a divisor of it, e.g. {resolution // 4} for 4x")
  if not 0 < m.crop_fraction <= 1:
    raise ConfigError(f"model.crop_fraction={m.crop_fraction}: must be in (0, 1]")
  crop = m.crop_fraction * resolution
  if abs(crop - round(crop)) > 1e-6:
    raise ConfigError(f"model.crop_fraction={m.crop_fraction} x data.resolution="
                      f"{resolution} = {crop:g} is not a whole number of pixels")
  multiple = 2**(len(m.channel_mults) - 1)
  for name, side in (("the crop side (model.crop_fraction x data.resolution)",
                      round(crop)), ("data.resolution", resolution)):
    if side % multiple:
      raise ConfigError(
          f"{name} = {side} is not divisible by {multiple}, which a UNet with "
          f"{len(m.channel_mults)} levels (model.channel_mults) needs")
  for mult in m.channel_mults:
    if (m.base_channels * mult) % m.norm_groups:
      raise ConfigError(
          f"model.norm_groups={m.norm_groups} does not divide the width "
          f"base_channels x {mult} = {m.base_channels * mult}")
  if m.degradation not in DEGRADATIONS:
    raise ConfigError(f"model.degradation={m.degradation!r}: use one of "
                      f"{DEGRADATIONS}")
  if m.low_res_noise < 0:
    raise ConfigError(f"model.low_res_noise={m.low_res_noise} must be >= 0")
  if not 0 <= m.dropout < 1:
    raise ConfigError(f"model.dropout={m.dropout}: must be in [0, 1)")
  diffusion_common.validate_diffusion_config(config)
  e = config.eval
  if min(e.loss_examples, e.num_examples, e.batch_size, e.num_samples) < 1:
    raise ConfigError("eval.loss_examples, eval.num_examples, eval.batch_size "
                      "and eval.num_samples must be >= 1")
  if e.num_samples > e.num_examples:
    raise ConfigError(f"eval.num_samples={e.num_samples} must be <= "
                      f"eval.num_examples={e.num_examples}")


def build_unet(config: ml_collections.ConfigDict) -> UNet:
  """The convolution-only UNet an upsampler config describes."""
  m = config.model
  return UNet(base_channels=m.base_channels, channel_mults=tuple(m.channel_mults),
              num_res_blocks=m.num_res_blocks, attention_resolutions=(),
              resolution=config.data.resolution, dropout=m.dropout,
              norm_groups=m.norm_groups, low_res_conditioning=True,
              dtype=diffusion_common.DTYPES[config.dtype], remat=m.remat)


def random_crops(uniforms: jax.Array, images: tuple[jax.Array, ...], size: int
                 ) -> tuple[jax.Array, ...]:
  """The same size x size window of every array in `images` (each [B, H, W, C],
  same B, H, W), a window per example, placed by `uniforms` [B, 2] in [0, 1)."""
  batch, height, width = images[0].shape[:3]
  if size == height == width:
    return images
  tops = jnp.floor(uniforms[:, 0] * (height - size + 1)).astype(jnp.int32)
  lefts = jnp.floor(uniforms[:, 1] * (width - size + 1)).astype(jnp.int32)

  def crop(image, top, left):
    return jax.lax.dynamic_slice(image, (top, left, 0),
                                 (size, size, image.shape[-1]))
  return tuple(jax.vmap(crop)(x, tops, lefts) for x in images)


class Upsampler:
  """An upsampler's UNet, noise schedule and degradation: its training loss and
  its sampler, shared by the stage and the sampling pipeline."""

  def __init__(self, config: ml_collections.ConfigDict):
    self.config = config
    self.model = build_unet(config)
    self.factor = upsampling_factor(config)
    self.crop_size = crop_size(config)
    self.parameterization = config.diffusion.parameterization
    self.schedule = diffusion_common.schedule_from_config(config)
    self._sampler = diffusion_common.make_ddim_sampler(
        self._apply, self.schedule, parameterization=self.parameterization)

  def init_params(self, rng: jax.Array) -> Any:
    """Params boxed with logical axis names (the same for any image size)."""
    x = jnp.zeros((1, self.crop_size, self.crop_size, 3))
    return self.model.init(rng, x, jnp.zeros((1,), jnp.int32), low_res=x)["params"]

  def degrade(self, rng: jax.Array, images: jax.Array) -> jax.Array:
    """High-res images [B, H, W, 3] -> their low-res inputs [B, H/f, W/f, 3]."""
    return degradations.degrade(rng, images, self.config.model.degradation,
                                self.factor)

  def training_pair(self, rng: jax.Array, images: jax.Array, *, train: bool = True
                    ) -> tuple[jax.Array, jax.Array]:
    """Full images [B, R, R, 3] -> (target crops, aligned upsampled low-res
    crops), both [B, crop, crop, 3]. `train=False`: no low-res noise."""
    return self._training_inputs(rng, images, train)[:2]

  def _training_inputs(self, rng, images, train):
    """(target crops, low-res crops, diffusion step indices t [B], diffusion
    noise [B, crop, crop, 3]), all from rng."""
    # Two draws for all the randomness but BSR's: each draw is a threefry
    # kernel, and they dominate this step's compile time on CPU.
    degrade_rng, uniform_rng, normal_rng = jax.random.split(rng, 3)
    images = images.astype(jnp.float32)
    batch, crop = images.shape[0], self.crop_size
    # Per example: crop top, crop left, low-res noise level, diffusion step.
    uniforms = jax.random.uniform(uniform_rng, (batch, 4))
    low_res = self.degrade(degrade_rng, images)
    max_noise = self.config.model.low_res_noise if train else 0.0
    crop_numel = crop * crop * images.shape[-1]
    normals = jax.random.normal(
        normal_rng, (batch, crop_numel + (low_res[0].size if max_noise else 0)))
    if max_noise:
      level = max_noise * uniforms[:, 2, None, None, None]
      low_res = low_res + level * normals[:, crop_numel:].reshape(low_res.shape)
    # The UNet's own resize, done before cropping so the crop sees exactly the
    # pixels the full-size sampler will see there (same-size resize is identity).
    upsampled = jax.image.resize(low_res, images.shape, "bilinear")
    target, low_res = random_crops(uniforms[:, :2], (images, upsampled), crop)
    num_timesteps = self.schedule.num_timesteps
    t = jnp.minimum((uniforms[:, 3] * num_timesteps).astype(jnp.int32),
                    num_timesteps - 1)
    noise = normals[:, :crop_numel].reshape(target.shape)
    return target, low_res, t, noise

  def _apply(self, params, x_t, t, low_res, drop=None, dropout_rng=None):
    del drop  # unconditional: no guidance
    return self.model.apply(
        {"params": params}, x_t, t, low_res=low_res,
        deterministic=dropout_rng is None,
        rngs=None if dropout_rng is None else {"dropout": dropout_rng})

  def losses(self, params, images: jax.Array, rng: jax.Array, *,
             train: bool = True) -> jax.Array:
    """Per-example diffusion loss [B] on random crops of full images [B, R, R, 3].

    `train=False` (held-out loss): no low-res noise, no dropout.
    """
    inputs_rng, dropout_rng = jax.random.split(rng)
    target, low_res, t, noise = self._training_inputs(inputs_rng, images, train)
    use_dropout = train and self.model.dropout > 0
    model_fn = lambda x_t, timesteps: self._apply(
        params, x_t, timesteps, low_res,
        dropout_rng=dropout_rng if use_dropout else None)
    per_example, _ = diffusion_common.image_losses(
        self.schedule, model_fn, target, None, t=t, noise=noise,
        parameterization=self.parameterization)
    return per_example

  def upsample(self, params, low_res: jax.Array, rng: jax.Array, *,
               num_steps: int | None = None, eta: float | None = None,
               clip_denoised: bool | None = None) -> jax.Array:
    """Low-res images [B, h, w, 3] in [-1, 1] -> float32 [B, h*f, w*f, 3] by DDIM
    (defaults from `config.sample`). Any h, w with h*f, w*f divisible by
    2^(levels - 1) work: the model is convolutions only."""
    s = self.config.sample
    batch, height, width, channels = low_res.shape
    return self._sampler(
        params, low_res, rng,
        shape=(batch, height * self.factor, width * self.factor, channels),
        num_steps=int(num_steps or s.num_steps),
        eta=float(s.eta if eta is None else eta),
        clip_denoised=bool(s.clip_denoised if clip_denoised is None
                           else clip_denoised))


def bilinear_upsample(low_res: jax.Array, factor: int) -> jax.Array:
  """The baseline: [B, h, w, C] -> [B, h*f, w*f, C], bilinear, clipped to [-1, 1]."""
  batch, height, width, channels = low_res.shape
  return jnp.clip(jax.image.resize(
      low_res, (batch, height * factor, width * factor, channels), "bilinear"),
                  -1, 1)


class UpsamplerStage(Stage):
  """Trains one upsampler of the cascade on full-resolution images."""

  def validate(self):
    validate_config(self.config)

  def prepare(self):
    c = self.config
    self.train_source = pipeline.get_data_source(c.data, c.data.train_split)
    self.eval_source = pipeline.get_data_source(c.data, c.data.eval_split)
    if len(self.eval_source) < c.eval.num_examples:
      raise ConfigError(
          f"the {c.data.eval_split!r} split has {len(self.eval_source)} images, "
          f"fewer than eval.num_examples={c.eval.num_examples}; lower it")
    self.upsampler = Upsampler(c)
    self._evaluated = None  # (step, images) of the last evaluation

  def _preprocess(self, record):
    image = np.asarray(record[pipeline.IMAGE])
    side = self.config.data.resolution
    if image.shape != (side, side, 3):  # datasets other than the bundled ones
      image = center_crop_and_resize(side)(record)[pipeline.IMAGE]
    return {pipeline.IMAGE: image}

  def init_params(self, rng):
    return self.upsampler.init_params(rng)

  def loss(self, params, batch, rng):
    return self.upsampler.losses(params, batch[pipeline.IMAGE], rng).mean(), {}

  def train_iterator(self):
    return pipeline.make_train_iterator(
        self.train_source, global_batch_size=self.config.batch_size,
        seed=self.config.seed, preprocess=self._preprocess)

  @functools.cached_property
  def _eval_losses(self):
    return jax.jit(lambda params, images, rng: self.upsampler.losses(
        params, images, rng, train=False))

  @functools.cached_property
  def _degrade(self):
    return jax.jit(self.upsampler.degrade)

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
      sample = self.upsampler.upsample(
          params, low_res, jax.random.fold_in(jax.random.fold_in(rng, start), 1))
      return {"low_res": low_res, "sample": sample,
              "bilinear": bilinear_upsample(low_res, self.upsampler.factor)}
    out = diffusion_common.map_batches(upsample, {"truth": truth},
                                       c.eval.batch_size)
    images = {k: grid.to_uint8(v) for k, v in out.items()}
    images["truth"] = grid.to_uint8(truth)
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
    images = self._upsampled(params, step)
    return {
        "eval/loss": float(np.average(np.concatenate(losses),
                                      weights=np.concatenate(weights))),
        "eval/psnr": float(np.mean(diffusion_common.psnr(images["sample"],
                                                         images["truth"]))),
        "eval/psnr_bilinear": float(np.mean(diffusion_common.psnr(
            images["bilinear"], images["truth"]))),
    }

  def write_samples(self, params, step):
    """workdir/samples/step_<N>.png: a row per held-out image, columns
    low-res (nearest-upscaled) | bilinear | sample | truth."""
    images = self._upsampled(params, step)  # on every host: it may compute
    if jax.process_index() != 0:
      return
    count = self.config.eval.num_samples
    low_res = grid.nearest_upscale(images["low_res"][:count], self.upsampler.factor)
    tiles = np.stack([low_res, images["bilinear"][:count],
                      images["sample"][:count], images["truth"][:count]], axis=1)
    path = os.path.join(self.workdir, "samples", f"step_{step}.png")
    grid.write_grid(path, tiles.reshape((-1,) + tiles.shape[2:]), rows=count,
                    cols=4)
    log.info("wrote %s", path)


def load_upsampler(workdir: str, step: int | None = None,
                   sharding: jax.sharding.Sharding | None = None
                   ) -> tuple[ml_collections.ConfigDict, Upsampler, Any, int]:
  """A trained upsampler from its workdir: (config, Upsampler, EMA params, step).

  Upsample with `upsampler.upsample(params, low_res, rng)`: low_res [B, h, w, 3]
  in [-1, 1] -> [B, h * f, w * f, 3], f = data.resolution // model.low_res.
  """
  config, params, step = frozen.load_trained(workdir, "upsampler", step, sharding)
  return config, Upsampler(config), params, step
