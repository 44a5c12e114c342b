"""Picks a sampler by name, so a generator's config can say which one it uses."""
from typing import Optional, Sequence

import jax

from unclip_jax.diffusion.analytic import analytic_sample
from unclip_jax.diffusion.samplers import ModelFn, ddim_sample, ddpm_sample
from unclip_jax.diffusion.schedules import Schedule

SAMPLERS = ("ddim", "ddpm", "analytic")


def sample(
  sampler: str,
  model_fn: ModelFn,
  schedule: Schedule,
  *,
  shape: Optional[Sequence[int]] = None,
  rng: Optional[jax.Array] = None,
  parameterization: str,
  eta: float = 0.0,
  variance: Optional[str] = None,
  learned_variance: bool = False,
  eps_moments: Optional[jax.Array] = None,
  x0_variance_bound: Optional[float] = 1.0,
  clip_denoised: bool = False,
  threshold_percentile: Optional[float] = None,
  x_T: Optional[jax.Array] = None,
  step_noise: Optional[jax.Array] = None,
  return_trajectory: bool = False,
):
  """Runs `ddim_sample`, `ddpm_sample` or `analytic_sample` (sampler, static).

  eta is used by 'ddim' only, variance by 'ddpm' only (see `ddpm_sample`),
  eps_moments (Gamma [K], required) and x0_variance_bound by 'analytic' only.
  learned_variance says the model outputs [prediction, v] (2C channels).
  clip_denoised: False, True (x0 clipped to [-1, 1]) or a range r > 0 (to [-r, r]).
  """
  common = dict(
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
  if sampler == "ddim":
    return ddim_sample(model_fn, schedule, eta=eta, **common)
  if sampler == "ddpm":
    return ddpm_sample(model_fn, schedule, variance=variance, **common)
  if sampler == "analytic":
    if eps_moments is None:
      raise ValueError("sampler='analytic' needs eps_moments (see estimate_eps_moments).")
    return analytic_sample(
      model_fn, schedule, eps_moments=eps_moments, x0_variance_bound=x0_variance_bound,
      **common,
    )
  raise ValueError(f"Unknown sampler {sampler!r}; expected one of {SAMPLERS}.")
