"""Diffusion math shared by every generative stage: pure functions, no Flax state.

See docs/diffusion.md for the conventions (step indices vs original timesteps,
respacing, model_fn contracts, guidance).
"""
from unclip_jax.diffusion.forward import (
  PARAMETERIZATIONS,
  coefficient,
  eps_from_v,
  per_example,
  predict_eps_from_x0,
  predict_x0_from_eps,
  q_sample,
  split_prediction,
  training_target,
  v_from_x0_eps,
  x0_from_v,
)
from unclip_jax.diffusion.losses import (
  discretized_gaussian_log_likelihood,
  mse_loss,
  normal_kl,
  training_losses,
  training_losses_at,
  variational_bound_terms,
)
from unclip_jax.diffusion.posterior import (
  PMeanVariance,
  dynamic_threshold,
  p_mean_variance,
  process_x0,
  q_posterior_mean_variance,
  static_clip,
)
from unclip_jax.diffusion.samplers import (
  ddim_invert,
  ddim_sample,
  ddpm_sample,
  guided,
  match_batch,
)
from unclip_jax.diffusion.schedules import (
  Schedule,
  cosine_betas,
  linear_betas,
  make_schedule,
  respace,
  respaced_indices,
  schedule_from_betas,
)

__all__ = [
  "PARAMETERIZATIONS",
  "PMeanVariance",
  "Schedule",
  "coefficient",
  "cosine_betas",
  "ddim_invert",
  "ddim_sample",
  "ddpm_sample",
  "discretized_gaussian_log_likelihood",
  "dynamic_threshold",
  "eps_from_v",
  "guided",
  "linear_betas",
  "make_schedule",
  "match_batch",
  "mse_loss",
  "normal_kl",
  "p_mean_variance",
  "per_example",
  "predict_eps_from_x0",
  "predict_x0_from_eps",
  "process_x0",
  "q_posterior_mean_variance",
  "q_sample",
  "respace",
  "respaced_indices",
  "schedule_from_betas",
  "split_prediction",
  "static_clip",
  "training_losses",
  "training_losses_at",
  "training_target",
  "v_from_x0_eps",
  "variational_bound_terms",
  "x0_from_v",
]
