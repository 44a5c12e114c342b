"""Noise schedules: betas and every per-step coefficient derived from them.

A `Schedule` is a pytree of float32 arrays of length T (plus int32 `timesteps`),
so it passes through `jax.jit` as an ordinary argument. Coefficients are
computed once in float64 numpy: products of ~1000 numbers close to 1 lose
several digits in float32.
"""
import math

import flax
import jax
import jax.numpy as jnp
import numpy as np


@flax.struct.dataclass
class Schedule:
  """Per-step diffusion coefficients, each of shape [T].

  `timesteps[k]` is the original training timestep that step k stands for:
  arange(T) for a training schedule, the kept indices after `respace`.
  Models are always called with these original indices.
  """

  betas: jax.Array
  alphas_cumprod: jax.Array
  alphas_cumprod_prev: jax.Array
  sqrt_alphas_cumprod: jax.Array
  sqrt_one_minus_alphas_cumprod: jax.Array
  sqrt_recip_alphas_cumprod: jax.Array
  sqrt_recipm1_alphas_cumprod: jax.Array
  posterior_variance: jax.Array
  posterior_log_variance_clipped: jax.Array
  posterior_mean_coef1: jax.Array
  posterior_mean_coef2: jax.Array
  timesteps: jax.Array  # int32 [T]

  @property
  def num_timesteps(self) -> int:
    return self.betas.shape[0]


def cosine_betas(num_timesteps: int, s: float = 0.008, max_beta: float = 0.999) -> np.ndarray:
  """Improved-DDPM cosine schedule: alpha_bar(t) = cos((t/T + s)/(1 + s) * pi/2)^2.

  Returns float64 [T] betas, beta_k = 1 - alpha_bar((k+1)/T) / alpha_bar(k/T),
  clipped at `max_beta` (alpha_bar(1) = 0 would otherwise give beta = 1).
  """
  def alpha_bar(u):
    return math.cos((u + s) / (1 + s) * math.pi / 2) ** 2

  betas = [
    min(1.0 - alpha_bar((k + 1) / num_timesteps) / alpha_bar(k / num_timesteps), max_beta)
    for k in range(num_timesteps)
  ]
  return np.asarray(betas, dtype=np.float64)


def linear_betas(num_timesteps: int) -> np.ndarray:
  """DDPM linear schedule, rescaled so any T covers the same noise range as T=1000.

  Returns float64 [T] from 1e-4 * 1000/T to 0.02 * 1000/T.
  """
  scale = 1000.0 / num_timesteps
  return np.linspace(scale * 1e-4, scale * 0.02, num_timesteps, dtype=np.float64)


_BETA_FUNCTIONS = {"cosine": cosine_betas, "linear": linear_betas}
SCHEDULES = tuple(_BETA_FUNCTIONS)  # the names make_schedule takes


def shift_snr(betas: np.ndarray, factor: float, max_beta: float = 0.999) -> np.ndarray:
  """Betas whose signal-to-noise ratio alpha_bar / (1 - alpha_bar) is `factor`
  times that of `betas` at every step (float64 [T]).

  A factor below 1 moves the whole schedule towards noise: the shifted
  schedules of simple diffusion (Hoogeboom et al. 2023) and of SD3, which
  match the noise to how much an image's coarse layout survives it. Where
  that layout (here, where an object sits) is decided only in the last few
  percent of steps, a model trains on it rarely and learns it late.
  """
  if factor <= 0:
    raise ValueError(f"snr_shift must be > 0, got {factor}.")
  alphas_cumprod = np.cumprod(1.0 - np.asarray(betas, np.float64))
  shifted = factor * alphas_cumprod / (1.0 - alphas_cumprod + factor * alphas_cumprod)
  previous = np.append(1.0, shifted[:-1])
  return np.minimum(1.0 - shifted / previous, max_beta)


def make_schedule(name: str, num_timesteps: int, snr_shift: float = 1.0) -> Schedule:
  """Builds a named schedule ('cosine' or 'linear') with T = num_timesteps,
  its signal-to-noise ratio multiplied by `snr_shift` (`shift_snr`)."""
  if name not in _BETA_FUNCTIONS:
    raise ValueError(
      f"Unknown noise schedule {name!r}; expected one of {sorted(_BETA_FUNCTIONS)}."
    )
  if num_timesteps < 1:
    raise ValueError(f"num_timesteps must be >= 1, got {num_timesteps}.")
  betas = _BETA_FUNCTIONS[name](num_timesteps)
  return schedule_from_betas(betas if snr_shift == 1.0 else shift_snr(betas, snr_shift))


def schedule_from_betas(betas, timesteps=None, alphas_cumprod=None) -> Schedule:
  """Derives every coefficient from betas [T] (computed in float64, stored float32).

  timesteps: int [T] original indices; defaults to arange(T). alphas_cumprod
  [T]: used as given instead of the product of 1 - betas, for a schedule that
  must round as another implementation does (`unclip_scheduler_schedule`).
  """
  betas = np.asarray(betas, dtype=np.float64)
  if betas.ndim != 1 or betas.shape[0] < 1:
    raise ValueError(f"betas must be a non-empty vector, got shape {betas.shape}.")
  if np.any(betas <= 0) or np.any(betas > 1):
    raise ValueError("betas must lie in (0, 1].")
  num_timesteps = betas.shape[0]
  if timesteps is None:
    timesteps = np.arange(num_timesteps)
  timesteps = np.asarray(timesteps)
  if timesteps.shape != betas.shape:
    raise ValueError(f"timesteps shape {timesteps.shape} != betas shape {betas.shape}.")

  alphas = 1.0 - betas
  if alphas_cumprod is None:
    alphas_cumprod = np.cumprod(alphas)
  alphas_cumprod = np.asarray(alphas_cumprod, dtype=np.float64)
  alphas_cumprod_prev = np.append(1.0, alphas_cumprod[:-1])
  posterior_variance = betas * (1.0 - alphas_cumprod_prev) / (1.0 - alphas_cumprod)
  # The posterior variance is 0 at step 0; its log would be -inf, so step 0
  # borrows step 1's value (improved DDPM). With a single step, use beta.
  first = posterior_variance[1] if num_timesteps > 1 else betas[0]
  posterior_log_variance_clipped = np.log(np.append(first, posterior_variance[1:]))

  arrays = dict(
    betas=betas,
    alphas_cumprod=alphas_cumprod,
    alphas_cumprod_prev=alphas_cumprod_prev,
    sqrt_alphas_cumprod=np.sqrt(alphas_cumprod),
    sqrt_one_minus_alphas_cumprod=np.sqrt(1.0 - alphas_cumprod),
    sqrt_recip_alphas_cumprod=np.sqrt(1.0 / alphas_cumprod),
    sqrt_recipm1_alphas_cumprod=np.sqrt(1.0 / alphas_cumprod - 1.0),
    posterior_variance=posterior_variance,
    posterior_log_variance_clipped=posterior_log_variance_clipped,
    posterior_mean_coef1=betas * np.sqrt(alphas_cumprod_prev) / (1.0 - alphas_cumprod),
    posterior_mean_coef2=(1.0 - alphas_cumprod_prev) * np.sqrt(alphas) / (1.0 - alphas_cumprod),
  )
  arrays = {name: jnp.asarray(value, dtype=jnp.float32) for name, value in arrays.items()}
  return Schedule(**arrays, timesteps=jnp.asarray(timesteps, dtype=jnp.int32))


def respaced_indices(num_timesteps: int, num_steps: int) -> np.ndarray:
  """Evenly spaced step indices in [0, T-1], both ends kept (int64 [num_steps]).

  A single step keeps only T-1: sampling must start from the noisiest level.
  """
  if not 1 <= num_steps <= num_timesteps:
    raise ValueError(f"num_steps must be in [1, {num_timesteps}], got {num_steps}.")
  if num_steps == 1:
    return np.asarray([num_timesteps - 1])
  # Same as improved-DDPM space_timesteps with one section: round(i * (T-1)/(n-1)).
  return np.round(np.linspace(0, num_timesteps - 1, num_steps)).astype(np.int64)


def respace(schedule: Schedule, num_steps: int) -> Schedule:
  """Keeps `num_steps` evenly spaced steps of `schedule`, alpha_bar preserved at each.

  New betas are 1 - abar_k / abar_{k-1} over the kept steps, so the cumulative
  product reproduces the original alpha_bar; `timesteps` maps each kept step
  to the original training index (respacing a respaced schedule composes).
  """
  kept = respaced_indices(schedule.num_timesteps, num_steps)
  alphas_cumprod = np.asarray(schedule.alphas_cumprod, dtype=np.float64)[kept]
  previous = np.append(1.0, alphas_cumprod[:-1])
  betas = 1.0 - alphas_cumprod / previous
  timesteps = np.asarray(schedule.timesteps)[kept]
  return schedule_from_betas(betas, timesteps=timesteps)


def unclip_scheduler_schedule(num_timesteps: int, num_steps: int) -> Schedule:
  """The cosine schedule respaced to `num_steps` as diffusers' UnCLIPScheduler
  (Karlo's) steps through it, rounding included: its betas and alpha_bar are
  float32 (alpha_bar a float32 running product), a step's beta is
  1 - alpha_bar_t / alpha_bar_prev except between consecutive timesteps, where
  it is the stored beta_t. The kept timesteps are `respaced_indices`'.

  The rounding matters at the last step (t = 0): there the posterior mean is
  x0 times beta_0 / (1 - alpha_bar_0), exactly 1 in float64 but 1 + 4e-4 for
  T = 1000 in float32, and the x0 clipping at t = T - 1 amplifies the
  difference in the stages after it.
  """
  betas32 = cosine_betas(num_timesteps).astype(np.float32)
  alphas_cumprod32 = np.cumprod(np.float32(1) - betas32, dtype=np.float32)
  kept = respaced_indices(num_timesteps, num_steps)
  alphas_cumprod = alphas_cumprod32[kept]
  previous = np.append(np.float32(1), alphas_cumprod[:-1])
  betas = np.float32(1) - alphas_cumprod / previous
  consecutive = np.diff(np.append(-1, kept)) == 1
  betas = np.where(consecutive, betas32[kept], betas)
  return schedule_from_betas(betas.astype(np.float64), timesteps=kept,
                             alphas_cumprod=alphas_cumprod)
