"""Analytic-DPM: ancestral sampling with the optimal reverse variance.

Bao, Li, Zhu, Zhang (2022), "Analytic-DPM: an Analytic Estimate of the Optimal
Reverse Variance in Diffusion Probabilistic Models", ICLR. For a DDPM reverse
step from kept step t down to s < t (step k of a possibly respaced schedule:
abar_t = alphas_cumprod[k], abar_s = alphas_cumprod_prev[k], beta_{t|s} =
betas[k] = 1 - abar_t / abar_s, lambda^2 = beta_tilde = posterior_variance[k],
bbar = 1 - abar), their Theorem 1 on the shortened forward process gives

  sigma*^2 = lambda^2 + (sqrt(bbar_t / alpha_{t|s}) - sqrt(bbar_s - lambda^2))^2 (1 - Gamma_t)
  Gamma_t  = E_{q(x_t)} ||eps_theta(x_t, t)||^2 / d

With lambda^2 = beta_tilde the squared bracket equals coef1^2 bbar_t / abar_t,
coef1 = sqrt(abar_s) beta_{t|s} / bbar_t being the posterior mean's x0
coefficient, so sigma*^2 = beta_tilde + coef1^2 * V_t, where V_t = bbar_t /
abar_t (1 - Gamma_t) is the per-dimension E Var(x0 | x_t). Their Theorem 2
bounds it: 0 <= 1 - Gamma_t <= 1, and V_t <= ((b - a) / 2)^2 for data in
[a, b]^d; the estimate is clipped to both, as the authors' code does.
The mean is DDPM's posterior mean at the predicted x0 (unchanged).
"""
from typing import Optional, Sequence

import jax
import jax.numpy as jnp

from unclip_jax.diffusion.forward import q_sample, split_prediction
from unclip_jax.diffusion.samplers import ModelFn, ancestral_sample, model_prediction
from unclip_jax.diffusion.schedules import Schedule


def analytic_variances(
  schedule: Schedule, eps_moments: jax.Array, *, x0_variance_bound: Optional[float] = 1.0
) -> jax.Array:
  """Analytic-DPM's reverse variance sigma*^2 [K] for each step of `schedule`.

  eps_moments: Gamma [K] from `estimate_eps_moments` on the same steps.
  x0_variance_bound: upper bound on the per-dimension Var(x0 | x_t):
  ((b - a) / 2)^2 for data in [a, b] (Theorem 2; 1 for images in [-1, 1]);
  the per-dimension variance of the training data bounds it for any data
  (law of total variance). None keeps only 0 <= 1 - Gamma <= 1. At the
  noisiest steps bbar/abar is huge (1e8 for cosine at T-1), so without a
  bound the Monte Carlo error of Gamma blows up the variance there.
  """
  eps_moments = jnp.asarray(eps_moments, dtype=jnp.float32)
  if eps_moments.shape != schedule.betas.shape:
    raise ValueError(
      f"eps_moments has shape {eps_moments.shape}; the schedule has "
      f"{schedule.num_timesteps} steps."
    )
  # sqrt_recipm1_alphas_cumprod^2 = bbar / abar.
  x0_variance = jnp.square(schedule.sqrt_recipm1_alphas_cumprod) * jnp.clip(
    1.0 - eps_moments, 0.0, 1.0
  )
  if x0_variance_bound is not None:
    x0_variance = jnp.minimum(x0_variance, x0_variance_bound)
  return schedule.posterior_variance + jnp.square(schedule.posterior_mean_coef1) * x0_variance


def estimate_eps_moments(
  model_fn: ModelFn,
  schedule: Schedule,
  x0: jax.Array,
  rng: jax.Array,
  *,
  parameterization: str,
  learned_variance: bool = False,
) -> jax.Array:
  """Gamma [K] float32: the mean over x0 and dimensions of eps_theta(x_k, k)^2.

  x0: training data [N, ...] (vectors [N, D] for the prior, images
  [N, H, W, C]), noised with q_sample at every step k of `schedule` (fresh
  noise per step, from fold_in(rng, k)). One lax.map over the steps, so the
  model is traced once. Average the results of equal-sized batches for more
  data. Estimating on the full schedule and gathering at
  `respaced_indices(T, n)` equals estimating on `respace(schedule, n)`
  (same abar and original timesteps), up to the noise drawn.
  """
  x0 = jnp.asarray(x0, dtype=jnp.float32)

  def moment_at(k):
    t = jnp.full(x0.shape[:1], k, dtype=jnp.int32)
    noise = jax.random.normal(jax.random.fold_in(rng, k), x0.shape, dtype=jnp.float32)
    x_t = q_sample(schedule, x0, t, noise)
    prediction = model_prediction(model_fn, schedule, x_t, k, learned_variance)
    _, eps = split_prediction(schedule, prediction, x_t, t, parameterization)
    return jnp.mean(jnp.square(eps))

  return jax.lax.map(moment_at, jnp.arange(schedule.num_timesteps, dtype=jnp.int32))


def analytic_sample(
  model_fn: ModelFn,
  schedule: Schedule,
  *,
  eps_moments: jax.Array,
  shape: Optional[Sequence[int]] = None,
  rng: jax.Array,
  parameterization: str,
  x0_variance_bound: Optional[float] = 1.0,
  learned_variance: bool = False,
  clip_denoised: bool = False,
  threshold_percentile: Optional[float] = None,
  x_T: Optional[jax.Array] = None,
  step_noise: Optional[jax.Array] = None,
  return_trajectory: bool = False,
):
  """Ancestral sampling with Analytic-DPM's variance (see `analytic_variances`).

  eps_moments: Gamma [K] for this schedule's steps. A learned-variance half of
  the model output is ignored. With clip_denoised or threshold_percentile the
  mean uses the processed x0, as the authors' code does, while the variance
  stays the one derived for the unprocessed mean E[x0 | x_t]; bounding
  Var(x0 | x_t) by the data range (x0_variance_bound) keeps the two
  consistent for bounded data. Same conventions and return values as
  `ddpm_sample` (no noise at k = 0).
  """
  variances = analytic_variances(schedule, eps_moments, x0_variance_bound=x0_variance_bound)
  return ancestral_sample(
    model_fn,
    schedule,
    noise_std=jnp.sqrt(variances),
    shape=shape,
    rng=rng,
    parameterization=parameterization,
    learned_variance=learned_variance,
    clip_denoised=clip_denoised,
    threshold_percentile=threshold_percentile,
    x_T=x_T,
    step_noise=step_noise,
    return_trajectory=return_trajectory,
  )
