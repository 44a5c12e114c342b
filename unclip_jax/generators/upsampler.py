"""An upsampler: low-res image -> high-res image (DALL-E 2 §2, App. C).

A convolution-only UNet (no attention, no text, no z_i) sees the noisy high-res
image concatenated with the bilinearly upsampled low-res image. Training makes
the low-res image inside the jitted loss from the full-resolution batch: the
configured degradation ('blur' for the 64->256 stage, 'bsr' for 256->1024),
optional gaussian noise on it, bilinear upsampling back to full size, then one
random crop of `crop_fraction` of the side, at the same place in the target and
in the upsampled low-res image. Every random choice comes from the step's rng,
so the loader only delivers full images. Because the network has only
convolutions, the params trained on crops run on the full image when sampling
(ddim, ddpm or analytic over a respaced schedule, one compiled call).
"""
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from unclip_jax.data import degradations
from unclip_jax.errors import ConfigError
from unclip_jax.generators import common
from unclip_jax.generators.base import (IMAGE, LOW_RES, ClipSizes, EpsMoments,
                                        Generator)
from unclip_jax.models.precision import DTYPES
from unclip_jax.models.unet import UNet

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
  common.check_unet_config(config, sides=(round(crop),))
  if m.degradation not in DEGRADATIONS:
    raise ConfigError(f"model.degradation={m.degradation!r}: use one of "
                      f"{DEGRADATIONS}")
  if m.low_res_noise < 0:
    raise ConfigError(f"model.low_res_noise={m.low_res_noise} must be >= 0")
  common.validate_diffusion_config(config)


def build_unet(config: ml_collections.ConfigDict) -> UNet:
  """The convolution-only UNet an upsampler config describes."""
  m = config.model
  return UNet(base_channels=m.base_channels, channel_mults=tuple(m.channel_mults),
              num_res_blocks=m.num_res_blocks, attention_resolutions=(),
              resolution=config.data.resolution, dropout=m.dropout,
              norm_groups=m.norm_groups, low_res_conditioning=True,
              dtype=DTYPES[config.dtype], remat=m.remat)


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


class Upsampler(Generator):
  """An upsampler's UNet, noise schedule and degradation: its training loss and
  its sampler."""

  def __init__(self, config: ml_collections.ConfigDict):
    self.config = config
    self.model = build_unet(config)
    self.factor = upsampling_factor(config)
    self.crop_size = crop_size(config)
    self.resolution = config.data.resolution
    self.parameterization = config.diffusion.parameterization
    self.schedule = common.schedule_from_config(config)
    self._sampler = common.make_sampler(
        self._apply, self.schedule, parameterization=self.parameterization)

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict,
                  clip_sizes: ClipSizes | None = None) -> "Upsampler":
    """`clip_sizes` is unused: an upsampler reads no CLIP."""
    del clip_sizes
    validate_config(config)
    return cls(config)

  def abstract_batch(self, batch_size: int) -> dict[str, jax.ShapeDtypeStruct]:
    """Full-resolution images: the loss degrades and crops them itself."""
    side = self.resolution
    return {IMAGE: jax.ShapeDtypeStruct((batch_size, side, side, 3), jnp.float32)}

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

  def losses(self, params, batch, rng: jax.Array, *, train: bool = True
             ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Per-example diffusion loss [B] on random crops of the batch's full images
    `image` [B, R, R, 3] in [-1, 1]; no aux.

    `train=False` (held-out loss): no low-res noise, no dropout.
    """
    inputs_rng, dropout_rng = jax.random.split(rng)
    target, low_res, t, noise = self._training_inputs(inputs_rng, batch[IMAGE],
                                                      train)
    use_dropout = train and self.model.dropout > 0
    model_fn = lambda x_t, timesteps: self._apply(
        params, x_t, timesteps, low_res,
        dropout_rng=dropout_rng if use_dropout else None)
    per_example, _ = common.image_losses(
        self.schedule, model_fn, target, None, t=t, noise=noise,
        parameterization=self.parameterization)
    return per_example, {}

  def sample(self, params, conditioning, rng: jax.Array, *,
             num_steps: int | None = None, guidance_scale: float | None = None,
             x_T: jax.Array | None = None, step_noise: jax.Array | None = None,
             sampler: str | None = None,
             eta: float | None = None, variance: str | None = None,
             clip_denoised: bool | None = None,
             threshold_percentile: float | None = None,
             eps_moments: EpsMoments | None = None) -> jax.Array:
    """Low-res images `low_res` [B, h, w, 3] in [-1, 1] (`conditioning`) -> float32
    [B, h*f, w*f, 3] (options left None take `config.sample`; `sampler`,
    `variance`, `threshold_percentile` as `Decoder.sample`; no learned variance
    here). Any h, w with h*f, w*f divisible by 2^(levels - 1) work: the model is
    convolutions only. Unconditional: `guidance_scale` must be None or 1."""
    if guidance_scale not in (None, 1, 1.0):
      raise ValueError("an upsampler is unconditional: it takes no guidance_scale")
    low_res = jnp.asarray(conditioning[LOW_RES], jnp.float32)
    batch, height, width, channels = low_res.shape
    moments, chosen = common.resolve_sampling(
        self, num_steps=num_steps, sampler=sampler, variance=variance, eta=eta,
        eps_moments=eps_moments)
    return self._sampler(
        params, low_res, rng, moments,
        shape=(batch, height * self.factor, width * self.factor, channels),
        x_T=x_T, step_noise=step_noise, **chosen, **common.image_sampling(
            self.config, clip_denoised=clip_denoised,
            threshold_percentile=threshold_percentile))

  def estimate_eps_moments(self, params, batch, rng: jax.Array, *,
                           grid_size: int) -> jax.Array:
    """Gamma [grid_size] on full held-out images `image` [B, R, R, 3] in
    [-1, 1], conditioned on their degraded low-res inputs (no added noise): the
    full-size images the sampler makes, not the training crops."""
    degrade_rng, noise_rng = jax.random.split(rng)
    images = batch[IMAGE].astype(jnp.float32)
    low_res = self.degrade(degrade_rng, images)
    return common.estimate_moments_on_grid(
        lambda x_t, t: self._apply(params, x_t, t, low_res), self.schedule,
        images, noise_rng, grid_size=grid_size,
        parameterization=self.parameterization)


def bilinear_upsample(low_res: jax.Array, factor: int) -> jax.Array:
  """The baseline: [B, h, w, C] -> [B, h*f, w*f, C], bilinear, clipped to [-1, 1]."""
  batch, height, width, channels = low_res.shape
  return jnp.clip(jax.image.resize(
      low_res, (batch, height * factor, width * factor, channels), "bilinear"),
                  -1, 1)


