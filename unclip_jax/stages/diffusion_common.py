"""What the image diffusion stages (decoder, upsamplers) share: the schedule and
its checks from config, the training loss on images, one compiled DDIM sampler,
batched evaluation, PSNR.

A stage's config has `diffusion.{schedule, num_timesteps, parameterization}` and
`sample.{num_steps, eta}`; these helpers read only those fields.
"""
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from unclip_jax import diffusion
from unclip_jax.errors import ConfigError
from unclip_jax.models.unet_blocks import IMAGE_AXES
from unclip_jax.parallel import distributed

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
SCHEDULES = ("cosine", "linear")

# apply_fn(params, x_t [B, H, W, C], t int32 [B] original timesteps, condition
# (a pytree of [B, ...] arrays, or None), drop bool [B]) -> model output.
ApplyFn = Callable[[Any, jax.Array, jax.Array, Any, jax.Array], jax.Array]


def validate_diffusion_config(config: ml_collections.ConfigDict, *,
                              parameterization_field: str | None = None) -> None:
  """One-line ConfigError for bad `diffusion.*` / `sample.*` values.

  `parameterization_field` (e.g. "model.parameterization"): where a stage keeps
  its parameterisation, if not in `diffusion.parameterization`.
  """
  d, s = config.diffusion, config.sample
  if d.schedule not in SCHEDULES:
    raise ConfigError(f"diffusion.schedule={d.schedule!r}: use one of {SCHEDULES}")
  field = parameterization_field or "diffusion.parameterization"
  parameterization = config
  for part in field.split("."):
    parameterization = parameterization[part]
  if parameterization not in diffusion.PARAMETERIZATIONS:
    raise ConfigError(f"{field}={parameterization!r}: use one of "
                      f"{tuple(diffusion.PARAMETERIZATIONS)}")
  if d.num_timesteps < 1:
    raise ConfigError(f"diffusion.num_timesteps={d.num_timesteps} must be >= 1")
  if not 1 <= s.num_steps <= d.num_timesteps:
    raise ConfigError(f"sample.num_steps={s.num_steps}: must be in "
                      f"[1, diffusion.num_timesteps={d.num_timesteps}]")
  if s.eta < 0:
    raise ConfigError(f"sample.eta={s.eta} must be >= 0")


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


def map_batches(fn: Callable[[dict, int], Any], arrays: dict[str, np.ndarray],
                batch_size: int) -> Any:
  """fn(batch, start) over `arrays` (same-length [N, ...] numpy) in chunks of
  `batch_size` rows; the last chunk is padded by repeating its final row, so one
  compiled shape serves every call. Returns fn's outputs (an array or a pytree
  of [batch_size, ...] arrays) concatenated to N rows, as numpy."""
  total = len(next(iter(arrays.values())))
  outputs = []
  for start in range(0, total, batch_size):
    rows = np.minimum(np.arange(start, start + batch_size), total - 1)
    out = distributed.to_host(fn({k: v[rows] for k, v in arrays.items()}, start))
    outputs.append(jax.tree.map(lambda x: np.asarray(x)[:total - start], out))
  return jax.tree.map(lambda *xs: np.concatenate(xs), *outputs)


def psnr(images: np.ndarray, reference: np.ndarray,
         max_db: float = 100.0) -> np.ndarray:
  """Per-image PSNR in dB of uint8 images [N, H, W, C] against `reference`
  (identical images give `max_db`)."""
  error = (np.asarray(images, np.float64) - np.asarray(reference, np.float64))**2
  mse = error.reshape(len(error), -1).mean(axis=1)
  return np.minimum(10 * np.log10(255.0**2 / np.maximum(mse, 1e-30)), max_db)
