"""The forward (noising) process and the eps / x0 / v parameterisations.

Shapes: x0, x_t, eps, v are [B, ...] (vectors [B, D] for the prior, images
[B, H, W, C] for decoders); t is int32 [B], an index into the schedule (not the
original timestep: see `Schedule.timesteps`). Per-example coefficients are
gathered at t and broadcast over the trailing axes.
"""
import jax
import jax.numpy as jnp

from unclip_jax.diffusion.schedules import Schedule

PARAMETERIZATIONS = ("eps", "x0", "v")


def per_example(values: jax.Array, like: jax.Array) -> jax.Array:
  """Reshapes [B] (or a scalar) to [B, 1, ..., 1] so it broadcasts against `like`."""
  values = jnp.broadcast_to(values, like.shape[:1])
  return values.reshape(values.shape + (1,) * (like.ndim - 1))


def coefficient(array: jax.Array, t: jax.Array, like: jax.Array) -> jax.Array:
  """array[t] for a schedule array [T] and t [B], as [B, 1, ..., 1] in like's rank."""
  return per_example(array[t], like)


def check_parameterization(parameterization: str) -> None:
  if parameterization not in PARAMETERIZATIONS:
    raise ValueError(
      f"Unknown parameterization {parameterization!r}; expected one of {PARAMETERIZATIONS}."
    )


def q_sample(schedule: Schedule, x0: jax.Array, t: jax.Array, noise: jax.Array) -> jax.Array:
  """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise: a draw from q(x_t | x0)."""
  return (
    coefficient(schedule.sqrt_alphas_cumprod, t, x0) * x0
    + coefficient(schedule.sqrt_one_minus_alphas_cumprod, t, x0) * noise
  )


def predict_x0_from_eps(
  schedule: Schedule, x_t: jax.Array, t: jax.Array, eps: jax.Array
) -> jax.Array:
  """x0 = (x_t - sqrt(1 - abar) eps) / sqrt(abar)."""
  return (
    coefficient(schedule.sqrt_recip_alphas_cumprod, t, x_t) * x_t
    - coefficient(schedule.sqrt_recipm1_alphas_cumprod, t, x_t) * eps
  )


def predict_eps_from_x0(
  schedule: Schedule, x_t: jax.Array, t: jax.Array, x0: jax.Array
) -> jax.Array:
  """eps = (x_t - sqrt(abar) x0) / sqrt(1 - abar)."""
  return (
    coefficient(schedule.sqrt_recip_alphas_cumprod, t, x_t) * x_t - x0
  ) / coefficient(schedule.sqrt_recipm1_alphas_cumprod, t, x_t)


def v_from_x0_eps(schedule: Schedule, x0: jax.Array, t: jax.Array, eps: jax.Array) -> jax.Array:
  """v = sqrt(abar) eps - sqrt(1 - abar) x0 (Salimans & Ho)."""
  return (
    coefficient(schedule.sqrt_alphas_cumprod, t, x0) * eps
    - coefficient(schedule.sqrt_one_minus_alphas_cumprod, t, x0) * x0
  )


def x0_from_v(schedule: Schedule, x_t: jax.Array, t: jax.Array, v: jax.Array) -> jax.Array:
  """x0 = sqrt(abar) x_t - sqrt(1 - abar) v."""
  return (
    coefficient(schedule.sqrt_alphas_cumprod, t, x_t) * x_t
    - coefficient(schedule.sqrt_one_minus_alphas_cumprod, t, x_t) * v
  )


def eps_from_v(schedule: Schedule, x_t: jax.Array, t: jax.Array, v: jax.Array) -> jax.Array:
  """eps = sqrt(1 - abar) x_t + sqrt(abar) v."""
  return (
    coefficient(schedule.sqrt_one_minus_alphas_cumprod, t, x_t) * x_t
    + coefficient(schedule.sqrt_alphas_cumprod, t, x_t) * v
  )


def split_prediction(
  schedule: Schedule,
  prediction: jax.Array,
  x_t: jax.Array,
  t: jax.Array,
  parameterization: str,
) -> tuple[jax.Array, jax.Array]:
  """Turns a model prediction (eps, x0 or v; [B, ...]) into the pair (x0, eps).

  The one place that knows the three parameterisations, with `training_target`.
  """
  check_parameterization(parameterization)
  if parameterization == "eps":
    return predict_x0_from_eps(schedule, x_t, t, prediction), prediction
  if parameterization == "x0":
    return prediction, predict_eps_from_x0(schedule, x_t, t, prediction)
  return x0_from_v(schedule, x_t, t, prediction), eps_from_v(schedule, x_t, t, prediction)


def training_target(
  schedule: Schedule, x0: jax.Array, t: jax.Array, noise: jax.Array, parameterization: str
) -> jax.Array:
  """What a model of this parameterisation should output for x_t = q_sample(x0, t, noise)."""
  check_parameterization(parameterization)
  if parameterization == "eps":
    return noise
  if parameterization == "x0":
    return x0
  return v_from_x0_eps(schedule, x0, t, noise)
