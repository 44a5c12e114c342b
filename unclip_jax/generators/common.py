"""What every diffusion generator shares: the config checks (diffusion, sample,
UNet sizes), the schedule from config, the training loss on images, and one
compiled DDIM sampler and inverter.

A generator's config has `diffusion.{schedule, num_timesteps, parameterization}`
and `sample.{num_steps, eta}`: the parameterisation is set there and only there.
"""
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from unclip_jax import diffusion
from unclip_jax.errors import ConfigError
from unclip_jax.models.unet_blocks import IMAGE_AXES

# apply_fn(params, x_t [B, H, W, C], t int32 [B] original timesteps, condition
# (a pytree of [B, ...] arrays, or None), drop bool [B]) -> model output.
ApplyFn = Callable[[Any, jax.Array, jax.Array, Any, jax.Array], jax.Array]


def validate_diffusion_config(config: ml_collections.ConfigDict) -> None:
  """One-line ConfigError for bad `diffusion.*` / `sample.*` values."""
  d, s = config.diffusion, config.sample
  if d.schedule not in diffusion.SCHEDULES:
    raise ConfigError(f"diffusion.schedule={d.schedule!r}: use one of "
                      f"{diffusion.SCHEDULES}")
  if d.parameterization not in diffusion.PARAMETERIZATIONS:
    raise ConfigError(f"diffusion.parameterization={d.parameterization!r}: use one "
                      f"of {tuple(diffusion.PARAMETERIZATIONS)}")
  if d.num_timesteps < 1:
    raise ConfigError(f"diffusion.num_timesteps={d.num_timesteps} must be >= 1")
  if not 1 <= s.num_steps <= d.num_timesteps:
    raise ConfigError(f"sample.num_steps={s.num_steps}: must be in "
                      f"[1, diffusion.num_timesteps={d.num_timesteps}]")
  if s.get("eta", 0.0) < 0:
    raise ConfigError(f"sample.eta={s.eta} must be >= 0")


def check_unet_config(config: ml_collections.ConfigDict, *,
                      sides: tuple[int, ...] | None = None) -> None:
  """One-line ConfigError for a UNet (`config.model`) that cannot be built at
  `data.resolution` (and every side in `sides`, e.g. an upsampler's crops):
  levels vs side, norm groups and head widths vs channels, attention sides."""
  m, side = config.model, config.data.resolution
  levels = len(m.channel_mults)
  multiple = 2**(levels - 1)
  for name, value in (("data.resolution", side),
                      *(("the crop side (model.crop_fraction x data.resolution)", s) for s in sides or ())):
    if value % multiple:
      raise ConfigError(f"{name} = {value} is not divisible by {multiple}, which a "
                        f"UNet with {levels} levels (model.channel_mults) needs")
  level_of_side = {side // 2**level: level for level in range(levels)}
  attention = tuple(m.get("attention_resolutions", ()))
  unknown = [s for s in attention if s not in level_of_side]
  if unknown:
    raise ConfigError(f"model.attention_resolutions {unknown} are not feature-map "
                      f"sides {sorted(level_of_side)} of a {side} px UNet; pick "
                      "from those")
  attended = {level_of_side[s] for s in attention}
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
  if not 0 <= m.get("dropout", 0.0) < 1:
    raise ConfigError(f"model.dropout={m.dropout}: must be in [0, 1)")


def schedule_from_config(config: ml_collections.ConfigDict) -> diffusion.Schedule:
  """The training schedule `config.diffusion` names (T steps)."""
  return diffusion.make_schedule(config.diffusion.schedule,
                                 config.diffusion.num_timesteps)


def image_losses(schedule: diffusion.Schedule, model_fn, images: jax.Array,
                 rng: jax.Array | None, *, parameterization: str,
                 t: jax.Array | None = None, noise: jax.Array | None = None,
                 learned_variance: bool = False, vlb_weight: float = 0.001
                 ) -> tuple[jax.Array, dict]:
  """Per-example diffusion loss [B] of images [B, H, W, C] in [-1, 1].

  `model_fn(x_t, t)` -> output. The step indices t (int32 [B]) and the noise
  (like images) are drawn from rng unless given: a stage that draws all its
  randomness at once passes them (each draw is a threefry kernel to compile).
  The images are constrained to the batch sharding first, so x_t is made where
  its rows live.
  """
  images = nn.with_logical_constraint(images.astype(jnp.float32),
                                      IMAGE_AXES[:3] + (None,))
  if t is None or noise is None:
    t_rng, noise_rng = jax.random.split(rng)
    if t is None:
      t = jax.random.randint(t_rng, images.shape[:1], 0, schedule.num_timesteps,
                             dtype=jnp.int32)
    if noise is None:
      noise = jax.random.normal(noise_rng, images.shape, jnp.float32)
  return diffusion.training_losses_at(
      schedule, model_fn, images, t, noise, parameterization=parameterization,
      learned_variance=learned_variance, vlb_weight=vlb_weight)


def make_ddim_sampler(apply_fn: ApplyFn, schedule: diffusion.Schedule, *,
                      parameterization: str, learned_variance: bool = False):
  """One compiled DDIM sampler over `schedule` respaced to `num_steps`.

  Returns `sample(params, condition, rng, *, shape, num_steps, eta=0.0,
  guidance_scale=1.0, clip_denoised=True, threshold_percentile=None, x_T=None)`
  -> float32 images `shape` ([B, H, W, C], roughly in [-1, 1]). `condition` is
  a pytree of [B, ...] arrays handed to `apply_fn` (tiled to 2B rows when
  guided). With guidance_scale != 1 the model runs once per step on the doubled
  batch, `drop` True on the unconditional half. `x_T` (like `shape`): the
  starting noise instead of a draw from rng (fixed across frames when
  interpolating, or from `make_ddim_inverter`). The keyword arguments but x_T
  are static: one compilation per (shapes, keywords).
  """
  def sample(params, condition, rng, *, shape, num_steps, eta=0.0,
             guidance_scale=1.0, clip_denoised=True, threshold_percentile=None,
             x_T=None):
    return diffusion.ddim_sample(
        _guided_model(apply_fn, params, condition, guidance_scale,
                      learned_variance),
        diffusion.respace(schedule, num_steps), shape=tuple(shape), rng=rng,
        parameterization=parameterization, eta=eta,
        learned_variance=learned_variance, clip_denoised=clip_denoised,
        threshold_percentile=threshold_percentile, x_T=x_T)

  return jax.jit(sample, static_argnames=(
      "shape", "num_steps", "eta", "guidance_scale", "clip_denoised",
      "threshold_percentile"))


def make_ddim_inverter(apply_fn: ApplyFn, schedule: diffusion.Schedule, *,
                       parameterization: str, learned_variance: bool = False):
  """The inverse of `make_ddim_sampler`'s eta=0 sampler, compiled once per shape.

  Returns `invert(params, condition, images, *, num_steps, guidance_scale=1.0,
  fixed_point_iterations=2)` -> x_T float32 like images [B, H, W, C]: sampling
  from it with the same condition, steps and guidance, eta=0 and
  clip_denoised=False gives the images back (to the ODE's discretisation error).
  """
  def invert(params, condition, images, *, num_steps, guidance_scale=1.0,
             fixed_point_iterations=2):
    return diffusion.ddim_invert(
        _guided_model(apply_fn, params, condition, guidance_scale,
                      learned_variance),
        diffusion.respace(schedule, num_steps), images,
        parameterization=parameterization, learned_variance=learned_variance,
        fixed_point_iterations=fixed_point_iterations)

  return jax.jit(invert, static_argnames=("num_steps", "guidance_scale",
                                          "fixed_point_iterations"))


def _guided_model(apply_fn, params, condition, guidance_scale, learned_variance):
  """model_fn(x_t, t) of `apply_fn` on `condition`, classifier-free guided."""
  def conditional(x_t, t, drop):
    return apply_fn(params, x_t, t, diffusion.match_batch(condition, x_t.shape[0]),
                    drop)
  return diffusion.guided(conditional, guidance_scale,
                          learned_variance=learned_variance)
