"""What every diffusion generator shares: the config checks (diffusion, sample,
UNet sizes), the schedule from config, the training loss on images, one compiled
sampler (ddim, ddpm or analytic, by name) and the DDIM inverter, and the
Analytic-DPM moments on a grid of timesteps.

A generator's config has `diffusion.{schedule, num_timesteps, parameterization}`
and `sample.{num_steps, sampler, eta, variance, ...}`: the parameterisation is
set there and only there.
"""
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

import numpy as np

from unclip_jax import diffusion, xla_options
from unclip_jax.errors import ConfigError, UserError
from unclip_jax.generators.base import EpsMoments
from unclip_jax.models.unet_blocks import IMAGE_AXES

# apply_fn(params, x_t [B, H, W, C], t int32 [B] original timesteps, condition
# (a pytree of [B, ...] arrays, or None), drop bool [B]) -> model output.
ApplyFn = Callable[[Any, jax.Array, jax.Array, Any, jax.Array], jax.Array]
# encode_fn(params, condition, drop bool [B]) -> what the model computes from the
# condition alone (a pytree of [B, ...] arrays); apply_fn then takes it in place
# of the condition, with drop ignored. A sampler encodes once per call, not once
# per step.
EncodeFn = Callable[[Any, Any, jax.Array], Any]


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
  if not d.get("snr_shift", 1.0) > 0:
    raise ConfigError(f"diffusion.snr_shift={d.snr_shift} must be > 0 (1: the "
                      "schedule as named)")
  if not 1 <= s.num_steps <= d.num_timesteps:
    raise ConfigError(f"sample.num_steps={s.num_steps}: must be in "
                      f"[1, diffusion.num_timesteps={d.num_timesteps}]")
  if s.get("eta", 0.0) < 0:
    raise ConfigError(f"sample.eta={s.eta} must be >= 0")
  if s.get("sampler", "ddim") not in diffusion.SAMPLERS:
    raise ConfigError(f"sample.sampler={s.sampler!r}: use one of "
                      f"{diffusion.SAMPLERS}")
  if s.get("variance") not in (None, *diffusion.DDPM_VARIANCES):
    raise ConfigError(f"sample.variance={s.variance!r}: use None (what the model "
                      f"was trained for) or one of {diffusion.DDPM_VARIANCES}")
  if s.get("variance") == "learned" and not config.get("model", {}).get(
      "learned_variance", False):
    raise ConfigError("sample.variance='learned' needs model.learned_variance="
                      "True; use None, 'small' or 'large'")
  percentile = s.get("threshold_percentile")
  if percentile is not None and not 0 < percentile <= 100:
    raise ConfigError(f"sample.threshold_percentile={percentile}: must be in "
                      "(0, 100], e.g. 99.5, or None (off)")
  for name in ("moments_timesteps", "moments_examples"):
    if s.get(name, 2) < 2:
      raise ConfigError(f"sample.{name}={s[name]} must be >= 2")
  if s.get("moments_timesteps", 2) > d.num_timesteps:
    raise ConfigError(f"sample.moments_timesteps={s.moments_timesteps} must be <= "
                      f"diffusion.num_timesteps={d.num_timesteps}")


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
  """The training schedule `config.diffusion` names (T steps); workdirs written
  before `snr_shift` existed read as unshifted."""
  return diffusion.make_schedule(config.diffusion.schedule,
                                 config.diffusion.num_timesteps,
                                 config.diffusion.get("snr_shift", 1.0))


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


def sampler_options(config: ml_collections.ConfigDict, *, sampler: str | None,
                    variance: str | None, eta: float | None,
                    learned_variance: bool) -> dict:
  """(sampler, variance, eta) from the caller or `config.sample`, checked, with
  the ones the sampler ignores normalised (no recompilation for them).

  variance None: what the model was trained for ('learned' for a
  learned-variance model, else 'small').
  """
  s = config.sample
  sampler = s.get("sampler", "ddim") if sampler is None else sampler
  if sampler not in diffusion.SAMPLERS:
    raise UserError(f"sampler={sampler!r}: use one of {diffusion.SAMPLERS}")
  eta = float(s.get("eta", 0.0) if eta is None else eta)
  if eta < 0:
    raise UserError(f"eta={eta:g} must be >= 0")
  variance = s.get("variance") if variance is None else variance
  if variance is None:
    variance = "learned" if learned_variance else "small"
  if variance not in diffusion.DDPM_VARIANCES:
    raise UserError(f"variance={variance!r}: use one of {diffusion.DDPM_VARIANCES}")
  if variance == "learned" and not learned_variance:
    raise UserError("variance='learned' needs a model trained with "
                    "model.learned_variance=True; use 'small' or 'large'")
  return {"sampler": sampler, "eta": eta if sampler == "ddim" else 0.0,
          "variance": variance if sampler == "ddpm" else None}


def moments_grid(num_timesteps: int, grid_size: int) -> np.ndarray:
  """The original timesteps eps moments are stored at: `respace`'s kept steps."""
  return diffusion.respaced_indices(num_timesteps, grid_size)


def estimate_moments_on_grid(model_fn, schedule: diffusion.Schedule, x0, rng, *,
                             grid_size: int, parameterization: str,
                             learned_variance: bool = False) -> jax.Array:
  """Gamma [grid_size] at `moments_grid(T, grid_size)`: one model call per grid
  point on the batch x0 (respacing keeps alpha_bar at the kept steps, so this is
  the full schedule's Gamma there)."""
  return diffusion.estimate_eps_moments(
      model_fn, diffusion.respace(schedule, grid_size), x0, rng,
      parameterization=parameterization, learned_variance=learned_variance)


def moments_for_steps(sampler: str, num_steps: int, num_timesteps: int,
                      moments: EpsMoments | None) -> jax.Array | None:
  """Gamma [num_steps] for `respace(schedule, num_steps)` when sampler is
  'analytic' (interpolated from the stored grid), else None."""
  if sampler != "analytic":
    return None
  if moments is None:
    raise UserError("sampler='analytic' needs the eps moments a training run "
                    "writes at its last step (eps_moments.json): train the stage "
                    "to config.total_steps, or choose sampler 'ddim' or 'ddpm'")
  return jnp.asarray(moments.at(diffusion.respaced_indices(num_timesteps,
                                                           num_steps)))


def resolve_sampling(generator, *, num_steps: int | None, sampler: str | None,
                     variance: str | None, eta: float | None,
                     eps_moments: EpsMoments | None,
                     learned_variance: bool = False) -> tuple[jax.Array | None, dict]:
  """(eps moments for the kept steps or None, the static sampler keywords
  num_steps / sampler / variance / eta) from the caller's options or the
  generator's `config.sample`; shared by every generator's `sample`."""
  num_steps = int(num_steps or generator.config.sample.num_steps)
  chosen = sampler_options(generator.config, sampler=sampler, variance=variance,
                           eta=eta, learned_variance=learned_variance)
  moments = moments_for_steps(
      chosen["sampler"], num_steps, generator.schedule.num_timesteps,
      generator.eps_moments if eps_moments is None else eps_moments)
  return moments, {"num_steps": num_steps, **chosen}


def image_sampling(config: ml_collections.ConfigDict, *, clip_denoised: bool | None,
                   threshold_percentile: float | None) -> dict:
  """The decoder's and upsamplers' static x0 processing: `clip_denoised` and
  `threshold_percentile` from the caller or `config.sample`."""
  s = config.sample
  if threshold_percentile is None:
    threshold_percentile = s.get("threshold_percentile")
  return {"clip_denoised": bool(s.clip_denoised if clip_denoised is None
                                else clip_denoised),
          "threshold_percentile": (None if threshold_percentile is None
                                   else float(threshold_percentile))}


def make_sampler(apply_fn: ApplyFn, schedule: diffusion.Schedule, *,
                 parameterization: str, learned_variance: bool = False,
                 encode_fn: EncodeFn | None = None,
                 x0_variance_bound: float | None = 1.0,
                 respace: Callable[[diffusion.Schedule, int],
                                   diffusion.Schedule] = diffusion.respace):
  """One compiled sampler over `schedule` respaced to `num_steps`.

  Returns `sample(params, condition, rng, eps_moments=None, *, shape,
  num_steps, sampler="ddim", eta=0.0, variance=None, guidance_scale=1.0,
  clip_denoised=True, threshold_percentile=None, x_T=None)` -> float32 images
  `shape` ([B, H, W, C], roughly in [-1, 1]). `sampler` picks `diffusion.sample`'s
  ddim (eta), ddpm (variance) or analytic (eps_moments: Gamma [num_steps] for
  the respaced steps, traced; `moments_for_steps`). `condition` is a pytree of
  [B, ...] arrays handed to `apply_fn` (tiled to 2B rows when guided). With
  guidance_scale != 1 the model runs once per step on the doubled batch, `drop`
  True on the unconditional half. `x_T` (like `shape`): the starting noise
  instead of a draw from rng (fixed across frames when interpolating, or from
  `make_ddim_inverter`); `step_noise` [num_steps, *shape]: each step's noise
  instead of draws (`diffusion.samplers`). The keyword arguments but x_T and
  step_noise are static: one
  compilation per (shapes, keywords). With `encode_fn` the condition is encoded
  once, before the steps. `x0_variance_bound`: Analytic-DPM's bound on
  Var(x0 | x_t) (1 for images in [-1, 1]). `respace(schedule, num_steps)`: the
  steps sampled (Karlo's stages keep diffusers' rounding of them).
  """
  def sample(params, condition, rng, eps_moments=None, *, shape, num_steps,
             sampler="ddim", eta=0.0, variance=None, guidance_scale=1.0,
             clip_denoised=True, threshold_percentile=None, x_T=None,
             step_noise=None):
    return diffusion.sample(
        sampler, guided_model(apply_fn, params, condition, guidance_scale,
                               learned_variance, encode_fn),
        respace(schedule, num_steps), shape=tuple(shape), rng=rng,
        parameterization=parameterization, eta=eta, variance=variance,
        learned_variance=learned_variance, eps_moments=eps_moments,
        x0_variance_bound=x0_variance_bound, clip_denoised=clip_denoised,
        threshold_percentile=threshold_percentile, x_T=x_T, step_noise=step_noise)

  return xla_options.jit(sample, static_argnames=(
      "shape", "num_steps", "sampler", "eta", "variance", "guidance_scale",
      "clip_denoised", "threshold_percentile"))


def make_ddim_inverter(apply_fn: ApplyFn, schedule: diffusion.Schedule, *,
                       parameterization: str, learned_variance: bool = False,
                       encode_fn: EncodeFn | None = None):
  """The inverse of `make_sampler`'s DDIM eta=0 sampler (inversion is DDIM by
  definition: the deterministic ODE run forwards), compiled once per shape.

  Returns `invert(params, condition, images, *, num_steps, guidance_scale=1.0,
  fixed_point_iterations=2)` -> x_T float32 like images [B, H, W, C]: sampling
  from it with the same condition, steps and guidance, eta=0 and
  clip_denoised=False gives the images back (to the ODE's discretisation error).
  """
  def invert(params, condition, images, *, num_steps, guidance_scale=1.0,
             fixed_point_iterations=2):
    return diffusion.ddim_invert(
        guided_model(apply_fn, params, condition, guidance_scale,
                      learned_variance, encode_fn),
        diffusion.respace(schedule, num_steps), images,
        parameterization=parameterization, learned_variance=learned_variance,
        fixed_point_iterations=fixed_point_iterations)

  return xla_options.jit(invert, static_argnames=("num_steps", "guidance_scale",
                                          "fixed_point_iterations"))


def run_inverter(generator, inverter, params, condition, images, *, num_steps,
                 guidance_scale, fixed_point_iterations: int) -> jax.Array:
  """A decoder's `invert`: `inverter` (from `make_ddim_inverter`) with the
  steps and guidance left None taken from `generator.config.sample`."""
  s = generator.config.sample
  return inverter(
      params, condition, images, num_steps=int(num_steps or s.num_steps),
      guidance_scale=float(s.guidance_scale if guidance_scale is None
                           else guidance_scale),
      fixed_point_iterations=fixed_point_iterations)


def guided_model(apply_fn, params, condition, guidance_scale, learned_variance,
                  encode_fn=None):
  """model_fn(x_t, t) of `apply_fn` on `condition`, classifier-free guided."""
  if encode_fn is None:
    def conditional(x_t, t, drop):
      return apply_fn(params, x_t, t,
                      diffusion.match_batch(condition, x_t.shape[0]), drop)
  else:
    # `guided` calls the model on [conditional rows, unconditional rows]: encode
    # those rows once, here, outside the sampler's loop.
    rows = jax.tree.leaves(condition)[0].shape[0]
    guided_rows = not (isinstance(guidance_scale, (int, float))
                       and guidance_scale == 1)
    drop = jnp.arange((1 + guided_rows) * rows) >= rows
    encoded = encode_fn(params, diffusion.match_batch(condition, drop.shape[0]),
                        drop)

    def conditional(x_t, t, drop):
      del drop  # encoded with the rows' drops already
      return apply_fn(params, x_t, t, encoded, None)
  return diffusion.guided(conditional, guidance_scale,
                          learned_variance=learned_variance)
