"""The true posterior q(x_{t-1} | x_t, x0) and the model's reverse step p(x_{t-1} | x_t).

Shapes as in forward.py: arrays [B, ...], t int32 [B] indexing the schedule.
With a learned variance the model output has twice the data's channels in the
LAST axis: [prediction, variance interpolation v] (improved DDPM).
"""
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp

from unclip_jax.diffusion.forward import coefficient, per_example, split_prediction
from unclip_jax.diffusion.schedules import Schedule

# Reverse-step variances of ancestral (DDPM) sampling: the posterior variance
# beta_tilde, beta itself (the two bounds of Ho et al.), or the model's learned
# interpolation between them (improved DDPM; needs a [prediction, v] output).
DDPM_VARIANCES = ("small", "large", "learned")


class PMeanVariance(NamedTuple):
  """The model's Gaussian reverse step; every field is [B, ...] like x_t."""

  mean: jax.Array
  variance: jax.Array
  log_variance: jax.Array
  pred_x0: jax.Array


def q_posterior_mean_variance(
  schedule: Schedule, x0: jax.Array, x_t: jax.Array, t: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Mean, variance and clipped log variance of q(x_{t-1} | x_t, x0).

  mean is [B, ...]; variance and log variance are [B, 1, ..., 1].
  """
  mean = (
    coefficient(schedule.posterior_mean_coef1, t, x_t) * x0
    + coefficient(schedule.posterior_mean_coef2, t, x_t) * x_t
  )
  variance = coefficient(schedule.posterior_variance, t, x_t)
  log_variance = coefficient(schedule.posterior_log_variance_clipped, t, x_t)
  return mean, variance, log_variance


def static_clip(x0: jax.Array, clip_range: float = 1.0) -> jax.Array:
  """Clips a predicted x0 to [-clip_range, clip_range] (images: [-1, 1])."""
  return jnp.clip(x0, -clip_range, clip_range)


def dynamic_threshold(x0: jax.Array, percentile: float) -> jax.Array:
  """Imagen dynamic thresholding of a predicted x0 [B, ...].

  percentile is in percent (e.g. 99.5, as `jnp.percentile`): per example,
  s = max(1, percentile of |x0|); x0 is clipped to [-s, s] and divided by s,
  so saturated pixels are pulled inwards instead of piling up at +-1.
  """
  if isinstance(percentile, (int, float)) and not 0.0 < percentile <= 100.0:
    raise ValueError(f"percentile is in percent, (0, 100]; got {percentile}.")
  flat = jnp.abs(x0).reshape(x0.shape[0], -1)
  s = jnp.maximum(jnp.percentile(flat, percentile, axis=1), 1.0)
  s = per_example(s, x0)
  return jnp.clip(x0, -s, s) / s


def process_x0(
  x0: jax.Array, *, clip_denoised: bool | float, threshold_percentile: Optional[float]
) -> jax.Array:
  """Applies dynamic thresholding if a percentile is given, else static clipping if
  asked: clip_denoised True clips to [-1, 1], a number r > 0 to [-r, r] (Karlo's
  prior clips its standardised embeddings to [-5, 5])."""
  if threshold_percentile is not None:
    return dynamic_threshold(x0, threshold_percentile)
  if clip_denoised is True:
    return static_clip(x0)
  if clip_denoised:
    return static_clip(x0, float(clip_denoised))
  return x0


def split_variance_channels(model_output: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Splits a learned-variance output [..., 2C] into (prediction, v), each [..., C]."""
  if model_output.shape[-1] % 2:
    raise ValueError(
      f"A learned-variance output needs an even last axis, got {model_output.shape}."
    )
  return jnp.split(model_output, 2, axis=-1)


def check_ddpm_variance(variance: str, learned_variance: bool) -> None:
  if variance not in DDPM_VARIANCES:
    raise ValueError(f"Unknown DDPM variance {variance!r}; expected one of {DDPM_VARIANCES}.")
  if variance == "learned" and not learned_variance:
    raise ValueError("variance='learned' needs a learned-variance model (learned_variance=True).")


def fixed_variances(schedule: Schedule, variance: str) -> jax.Array:
  """The per-step reverse variance [K] of a fixed choice, 'small' or 'large'.

  small: the posterior variance beta_tilde_k; large: beta_k. Both are of THIS
  (usually respaced) schedule. Step 0 borrows beta_tilde_1 in both, as improved
  DDPM does (its clipped log for 'small', guided-diffusion's fixed_large for
  'large'): beta_tilde_0 = 0 has no log, and samplers add no noise at step 0.
  """
  if variance == "small":
    return jnp.exp(schedule.posterior_log_variance_clipped)
  if variance == "large":
    if schedule.num_timesteps == 1:
      return schedule.betas
    return jnp.concatenate([schedule.posterior_variance[1:2], schedule.betas[1:]])
  raise ValueError(f"fixed_variances takes 'small' or 'large', got {variance!r}.")


def learned_log_variance(
  schedule: Schedule, variance_values: jax.Array, t: jax.Array
) -> jax.Array:
  """Interpolates log variance between the posterior's (v=-1) and log beta_t (v=+1)."""
  min_log = coefficient(schedule.posterior_log_variance_clipped, t, variance_values)
  max_log = coefficient(jnp.log(schedule.betas), t, variance_values)
  fraction = (variance_values + 1.0) / 2.0
  return fraction * max_log + (1.0 - fraction) * min_log


def p_mean_variance(
  schedule: Schedule,
  model_output: jax.Array,
  x_t: jax.Array,
  t: jax.Array,
  *,
  parameterization: str,
  learned_variance: bool,
  clip_denoised: bool = False,
  threshold_percentile: Optional[float] = None,
) -> PMeanVariance:
  """The reverse step p(x_{t-1} | x_t) given a model output at x_t.

  model_output: [B, ..., C], or [B, ..., 2C] with learned_variance. The mean is
  the posterior mean at the (optionally clipped or thresholded) predicted x0;
  the variance is learned, or the posterior variance when fixed.
  """
  if learned_variance:
    prediction, variance_values = split_variance_channels(model_output)
    log_variance = learned_log_variance(schedule, variance_values, t)
    variance = jnp.exp(log_variance)
  else:
    prediction = model_output
    variance = jnp.broadcast_to(coefficient(schedule.posterior_variance, t, x_t), x_t.shape)
    log_variance = jnp.broadcast_to(
      coefficient(schedule.posterior_log_variance_clipped, t, x_t), x_t.shape
    )
  pred_x0, _ = split_prediction(schedule, prediction, x_t, t, parameterization)
  pred_x0 = process_x0(
    pred_x0, clip_denoised=clip_denoised, threshold_percentile=threshold_percentile
  )
  mean, _, _ = q_posterior_mean_variance(schedule, pred_x0, x_t, t)
  return PMeanVariance(mean=mean, variance=variance, log_variance=log_variance, pred_x0=pred_x0)
