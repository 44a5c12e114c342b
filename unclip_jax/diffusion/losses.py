"""Training losses: the simple MSE objective and improved DDPM's hybrid VLB term.

Shapes: x0 [B, ...]; per-example losses [B]. `model_fn(x_t, t)` maps x_t [B, ...]
and the ORIGINAL timesteps t int32 [B] (`schedule.timesteps` of the sampled
indices) to the model output [B, ..., C], or [B, ..., 2C] with learned variance.
"""
import math
from typing import Callable

import jax
import jax.numpy as jnp

from unclip_jax.diffusion.forward import q_sample, training_target
from unclip_jax.diffusion.posterior import (
  p_mean_variance,
  q_posterior_mean_variance,
  split_variance_channels,
)
from unclip_jax.diffusion.schedules import Schedule

ModelFn = Callable[[jax.Array, jax.Array], jax.Array]

# Bounds on a learned log variance inside the loss only: a model output far
# outside v in [-1, 1] would otherwise overflow exp() and turn the KL into inf/NaN.
_MIN_LOG_VARIANCE = -30.0
_MAX_LOG_VARIANCE = 10.0
# Floor inside log() of the discretized likelihood: keeps log and its gradient finite.
_MIN_PROBABILITY = 1e-12


def mean_over_non_batch(x: jax.Array) -> jax.Array:
  """[B, ...] -> [B]."""
  return jnp.mean(x, axis=tuple(range(1, x.ndim)))


def mse_loss(prediction: jax.Array, target: jax.Array) -> jax.Array:
  """Per-example mean squared error, [B, ...] -> [B] (computed in float32)."""
  error = prediction.astype(jnp.float32) - target.astype(jnp.float32)
  return mean_over_non_batch(jnp.square(error))


def normal_kl(mean1, logvar1, mean2, logvar2) -> jax.Array:
  """Elementwise KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))) in nats."""
  return 0.5 * (
    -1.0
    + logvar2
    - logvar1
    + jnp.exp(logvar1 - logvar2)
    + jnp.square(mean1 - mean2) * jnp.exp(-logvar2)
  )


def approx_standard_normal_cdf(x: jax.Array) -> jax.Array:
  """The tanh approximation of the standard normal CDF used by improved DDPM."""
  return 0.5 * (1.0 + jnp.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * jnp.power(x, 3))))


def discretized_gaussian_log_likelihood(
  x: jax.Array, *, means: jax.Array, log_scales: jax.Array
) -> jax.Array:
  """Elementwise log-likelihood (nats) of 8-bit images x in [-1, 1] under a Gaussian.

  Each pixel value owns a bin of width 2/255; the outermost bins extend to
  -inf and +inf (improved DDPM). log_scales is the log standard deviation.
  """
  centered = x - means
  inv_stdv = jnp.exp(-log_scales)
  cdf_plus = approx_standard_normal_cdf(inv_stdv * (centered + 1.0 / 255.0))
  cdf_min = approx_standard_normal_cdf(inv_stdv * (centered - 1.0 / 255.0))
  # Every branch is floored so that jnp.where never selects from (or
  # differentiates through) a log(0).
  log_cdf_plus = jnp.log(jnp.maximum(cdf_plus, _MIN_PROBABILITY))
  log_one_minus_cdf_min = jnp.log(jnp.maximum(1.0 - cdf_min, _MIN_PROBABILITY))
  log_cdf_delta = jnp.log(jnp.maximum(cdf_plus - cdf_min, _MIN_PROBABILITY))
  return jnp.where(
    x < -0.999,
    log_cdf_plus,
    jnp.where(x > 0.999, log_one_minus_cdf_min, log_cdf_delta),
  )


def variational_bound_terms(
  schedule: Schedule,
  model_output: jax.Array,
  *,
  x0: jax.Array,
  x_t: jax.Array,
  t: jax.Array,
  parameterization: str,
  learned_variance: bool,
) -> jax.Array:
  """The VLB term L_t in bits per dimension, [B].

  KL(q(x_{t-1} | x_t, x0) || p(x_{t-1} | x_t)) for t > 0, and the discretized
  decoder NLL -log p(x0 | x_1) at t = 0. t indexes the schedule.
  """
  true_mean, _, true_log_variance = q_posterior_mean_variance(schedule, x0, x_t, t)
  model = p_mean_variance(
    schedule,
    model_output,
    x_t,
    t,
    parameterization=parameterization,
    learned_variance=learned_variance,
  )
  model_log_variance = jnp.clip(model.log_variance, _MIN_LOG_VARIANCE, _MAX_LOG_VARIANCE)
  kl = normal_kl(true_mean, true_log_variance, model.mean, model_log_variance)
  kl = mean_over_non_batch(kl) / math.log(2.0)
  nll = -discretized_gaussian_log_likelihood(
    x0, means=model.mean, log_scales=0.5 * model_log_variance
  )
  nll = mean_over_non_batch(nll) / math.log(2.0)
  return jnp.where(t == 0, nll, kl)


def training_losses_at(
  schedule: Schedule,
  model_fn: ModelFn,
  x0: jax.Array,
  t: jax.Array,
  noise: jax.Array,
  *,
  parameterization: str,
  learned_variance: bool = False,
  vlb_weight: float = 0.001,
) -> tuple[jax.Array, dict]:
  """`training_losses` at given step indices t [B] and noise [B, ...]."""
  x0 = x0.astype(jnp.float32)
  x_t = q_sample(schedule, x0, t, noise)
  model_output = model_fn(x_t, schedule.timesteps[t]).astype(jnp.float32)
  target = training_target(schedule, x0, t, noise, parameterization)
  if not learned_variance:
    mse = mse_loss(model_output, target)
    return mse, {"mse": mse, "t": t}

  prediction, variance_values = split_variance_channels(model_output)
  mse = mse_loss(prediction, target)
  # The VLB sees a frozen prediction: it trains only the variance channels,
  # leaving the mean to the simple objective (improved DDPM's L_hybrid).
  frozen_output = jnp.concatenate([jax.lax.stop_gradient(prediction), variance_values], -1)
  vlb = variational_bound_terms(
    schedule,
    frozen_output,
    x0=x0,
    x_t=x_t,
    t=t,
    parameterization=parameterization,
    learned_variance=True,
  )
  # L_vlb sums L_t over all T steps; one uniformly drawn t estimates it as T * L_t.
  loss = mse + vlb_weight * schedule.num_timesteps * vlb
  return loss, {"mse": mse, "vlb": vlb, "t": t}


def training_losses(
  schedule: Schedule,
  model_fn: ModelFn,
  x0: jax.Array,
  rng: jax.Array,
  *,
  parameterization: str,
  learned_variance: bool = False,
  vlb_weight: float = 0.001,
) -> tuple[jax.Array, dict]:
  """Per-example diffusion loss [B] for a batch x0 [B, ...], with t and noise from rng.

  The loss is the MSE between the model output and the parameterisation's
  target (noise for 'eps', x0 for 'x0' as the prior does, v for 'v'). With a
  learned variance it adds vlb_weight * T * L_t, the hybrid objective of
  improved DDPM (vlb_weight=0.001 at T=1000 matches the paper). The aux dict
  holds 'mse' [B], 't' [B] (sampled indices) and, with learned variance,
  'vlb' [B] in bits per dimension.
  """
  t_rng, noise_rng = jax.random.split(rng)
  batch_size = x0.shape[0]
  t = jax.random.randint(t_rng, (batch_size,), 0, schedule.num_timesteps, dtype=jnp.int32)
  noise = jax.random.normal(noise_rng, x0.shape, dtype=jnp.float32)
  return training_losses_at(
    schedule,
    model_fn,
    x0,
    t,
    noise,
    parameterization=parameterization,
    learned_variance=learned_variance,
    vlb_weight=vlb_weight,
  )
