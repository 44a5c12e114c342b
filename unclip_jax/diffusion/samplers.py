"""Compiled samplers (DDIM, ancestral DDPM), DDIM inversion and classifier-free guidance.

Analytic-DPM lives in analytic.py; `dispatch.sample` picks a sampler by name.

Every loop runs inside one `jax.lax.scan`, so a sampler traces to a single
computation and can sit inside an outer `jax.jit`. Conventions:
- `model_fn(x_t, t)` gets x_t [B, ...] and t int32 [B], the ORIGINAL training
  timesteps (`schedule.timesteps[k]`), so a model trained on the full schedule
  works unchanged on a respaced one.
- Step k of a schedule of length K goes from noise level alpha_bar[k] to
  alpha_bar_prev[k]; sampling runs k = K-1 ... 0.
- Randomness: x_T from split(rng)[0]; step k's noise from fold_in(split(rng)[1], k).
  The same rng gives the same sample. `step_noise` [K, B, ...] replaces the
  draws: entry i is the noise of the i-th step taken (i = 0 at the noisiest
  level; the last entry is never used, the last step adds none). With x_T it
  makes a sampler reproduce another implementation's run exactly.
"""
from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp

from unclip_jax.diffusion.forward import coefficient, predict_eps_from_x0, split_prediction
from unclip_jax.diffusion.posterior import (
  check_ddpm_variance,
  fixed_variances,
  p_mean_variance,
  process_x0,
  split_variance_channels,
)
from unclip_jax.diffusion.schedules import Schedule

ModelFn = Callable[[jax.Array, jax.Array], jax.Array]
ConditionalModelFn = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]


def guided(
  model_fn: ConditionalModelFn, guidance_scale, *, learned_variance: bool = False
) -> ModelFn:
  """Classifier-free guidance: turns model_fn(x_t, t, drop_condition) into model_fn(x_t, t).

  The guided function calls model_fn once on [x_t, x_t] ([2B, ...]) with
  drop_condition = [False]*B + [True]*B, so model_fn must repeat its own
  conditioning to 2B rows (row i and row B+i share it; see `match_batch`).
  Output: uncond + guidance_scale * (cond - uncond) on the prediction
  channels; with learned_variance the variance half of the last axis is the
  conditional one. A Python scale of 1 returns the plain conditional model.
  """
  if isinstance(guidance_scale, (int, float)) and guidance_scale == 1:
    def conditional(x_t, t):
      return model_fn(x_t, t, jnp.zeros(x_t.shape[:1], dtype=bool))

    return conditional

  def guided_fn(x_t, t):
    batch_size = x_t.shape[0]
    drop = jnp.concatenate(
      [jnp.zeros((batch_size,), dtype=bool), jnp.ones((batch_size,), dtype=bool)]
    )
    output = model_fn(
      jnp.concatenate([x_t, x_t]), jnp.concatenate([t, t]), drop
    ).astype(jnp.float32)
    cond, uncond = output[:batch_size], output[batch_size:]
    if learned_variance:
      cond, cond_variance = split_variance_channels(cond)
      uncond, _ = split_variance_channels(uncond)
    combined = uncond + guidance_scale * (cond - uncond)
    if learned_variance:
      combined = jnp.concatenate([combined, cond_variance], axis=-1)
    return combined

  return guided_fn


def match_batch(tree, batch_size: int):
  """Tiles every leaf [b, ...] along axis 0 to [batch_size, ...] (for guided batches)."""
  def tile(leaf):
    repeats = batch_size // leaf.shape[0]
    if repeats * leaf.shape[0] != batch_size:
      raise ValueError(f"Cannot tile a batch of {leaf.shape[0]} to {batch_size}.")
    return jnp.concatenate([leaf] * repeats) if repeats > 1 else leaf

  return jax.tree.map(tile, tree)


def _call_model(model_fn, schedule, x, k):
  """Model output at step index k (int32 []), called with the original timestep, float32."""
  t = jnp.full(x.shape[:1], schedule.timesteps[k], dtype=jnp.int32)
  return model_fn(x, t).astype(jnp.float32)


def model_prediction(model_fn, schedule, x, k, learned_variance):
  """Model output at step index k as [B, ..., C], the learned-variance half dropped."""
  output = _call_model(model_fn, schedule, x, k)
  if learned_variance:
    output, _ = split_variance_channels(output)
  return output


def _initial_noise(shape, rng, x_T):
  if x_T is not None:
    return jnp.asarray(x_T, dtype=jnp.float32)
  if shape is None or rng is None:
    raise ValueError("Pass x_T, or both shape and rng.")
  return jax.random.normal(rng, tuple(shape), dtype=jnp.float32)


def _run_reverse(step_fn, schedule, *, shape, rng, x_T, step_noise, return_trajectory):
  """Runs step_fn(x, k, noise) for k = K-1 ... 0 under one lax.scan, where
  noise() is that step's standard normal draw [B, ...] (only drawn if called)."""
  if rng is None:
    init_rng, loop_rng = None, jax.random.PRNGKey(0)  # unused by deterministic steps
  else:
    init_rng, loop_rng = jax.random.split(rng)
  x = _initial_noise(shape, init_rng, x_T)
  num_steps = schedule.num_timesteps
  if step_noise is not None:
    step_noise = jnp.asarray(step_noise, jnp.float32)
    if step_noise.shape != (num_steps,) + x.shape:
      raise ValueError(f"step_noise has shape {step_noise.shape}; sampling {num_steps} "
                       f"steps of {x.shape} needs {(num_steps,) + x.shape}.")

  def body(x, inputs):
    k, given = inputs
    if given is None:
      noise = lambda: jax.random.normal(jax.random.fold_in(loop_rng, k), x.shape, x.dtype)
    else:
      noise = lambda: given
    x = step_fn(x, k, noise)
    return x, (x if return_trajectory else None)

  steps = jnp.arange(num_steps - 1, -1, -1, dtype=jnp.int32)
  sample, trajectory = jax.lax.scan(body, x, (steps, step_noise))
  if return_trajectory:
    return sample, jnp.concatenate([x[None], trajectory])
  return sample


def ddim_sample(
  model_fn: ModelFn,
  schedule: Schedule,
  *,
  shape: Optional[Sequence[int]] = None,
  rng: Optional[jax.Array] = None,
  parameterization: str,
  eta: float = 0.0,
  learned_variance: bool = False,
  clip_denoised: bool = False,
  threshold_percentile: Optional[float] = None,
  x_T: Optional[jax.Array] = None,
  step_noise: Optional[jax.Array] = None,
  return_trajectory: bool = False,
):
  """DDIM sampling (Song et al.) over every step of `schedule` (usually respaced).

  shape: [B, ...] of x_T (drawn from rng unless x_T is given). eta=0 is the
  deterministic ODE; eta=1 matches DDPM's noise level. A learned variance
  half of the model output is ignored. Returns the sample [B, ...] or, with
  return_trajectory, (sample, trajectory [K+1, B, ...]) from x_T to the sample.
  """
  # eta is usually a Python number; a traced eta takes the stochastic path.
  deterministic = isinstance(eta, (int, float)) and eta == 0
  if not deterministic and rng is None:
    raise ValueError("ddim_sample with eta != 0 needs an rng.")

  def step(x, k, noise):
    prediction = model_prediction(model_fn, schedule, x, k, learned_variance)
    t = jnp.full(x.shape[:1], k, dtype=jnp.int32)
    x0, eps = split_prediction(schedule, prediction, x, t, parameterization)
    if clip_denoised or threshold_percentile is not None:
      # Re-derive eps from the clipped x0 so the step stays on a consistent path.
      x0 = process_x0(x0, clip_denoised=clip_denoised, threshold_percentile=threshold_percentile)
      eps = predict_eps_from_x0(schedule, x, t, x0)
    alpha_bar = coefficient(schedule.alphas_cumprod, t, x)
    alpha_bar_prev = coefficient(schedule.alphas_cumprod_prev, t, x)
    sigma = (
      eta
      * jnp.sqrt((1.0 - alpha_bar_prev) / (1.0 - alpha_bar))
      * jnp.sqrt(1.0 - alpha_bar / alpha_bar_prev)
    )
    direction = jnp.sqrt(jnp.maximum(1.0 - alpha_bar_prev - jnp.square(sigma), 0.0))
    mean = jnp.sqrt(alpha_bar_prev) * x0 + direction * eps
    if deterministic:
      return mean
    # sigma is 0 at k = 0 (alpha_bar_prev = 1), so the last step adds no noise.
    return mean + sigma * noise()

  return _run_reverse(
    step, schedule, shape=shape, rng=rng, x_T=x_T, step_noise=step_noise,
    return_trajectory=return_trajectory,
  )


def resolve_ddpm_variance(variance: Optional[str], learned_variance: bool) -> str:
  """None means 'learned' for a learned-variance model, else 'small' (the old default)."""
  if variance is None:
    variance = "learned" if learned_variance else "small"
  check_ddpm_variance(variance, learned_variance)
  return variance


def ancestral_sample(
  model_fn: ModelFn,
  schedule: Schedule,
  *,
  noise_std: Optional[jax.Array],
  shape: Optional[Sequence[int]],
  rng: jax.Array,
  parameterization: str,
  learned_variance: bool,
  clip_denoised: bool,
  threshold_percentile: Optional[float],
  x_T: Optional[jax.Array],
  return_trajectory: bool,
  step_noise: Optional[jax.Array] = None,
):
  """x_{k-1} = posterior mean at the predicted x0 + noise_std[k] * z (none at k = 0).

  noise_std: [K], or None for the model's learned variance (learned_variance
  must then be True). With learned_variance and a fixed noise_std, the
  model's variance half is ignored. Shared by `ddpm_sample` and
  `analytic_sample`, which differ only in the variance.
  """
  use_learned = noise_std is None

  def step(x, k, noise):
    t = jnp.full(x.shape[:1], k, dtype=jnp.int32)
    output = _call_model(model_fn, schedule, x, k)
    if learned_variance and not use_learned:
      output, _ = split_variance_channels(output)
    out = p_mean_variance(
      schedule,
      output,
      x,
      t,
      parameterization=parameterization,
      learned_variance=use_learned,
      clip_denoised=clip_denoised,
      threshold_percentile=threshold_percentile,
    )
    std = jnp.exp(0.5 * out.log_variance) if use_learned else noise_std[k]
    return out.mean + jnp.where(k > 0, 1.0, 0.0) * std * noise()

  return _run_reverse(
    step, schedule, shape=shape, rng=rng, x_T=x_T, step_noise=step_noise,
    return_trajectory=return_trajectory,
  )


def ddpm_sample(
  model_fn: ModelFn,
  schedule: Schedule,
  *,
  shape: Optional[Sequence[int]] = None,
  rng: jax.Array,
  parameterization: str,
  variance: Optional[str] = None,
  learned_variance: bool = False,
  clip_denoised: bool = False,
  threshold_percentile: Optional[float] = None,
  x_T: Optional[jax.Array] = None,
  step_noise: Optional[jax.Array] = None,
  return_trajectory: bool = False,
):
  """Ancestral sampling x_{k-1} ~ p(x_{k-1} | x_k) over every step of `schedule`.

  variance (one of DDPM_VARIANCES, static): 'small' (beta_tilde), 'large'
  (beta), both of the respaced schedule (see `fixed_variances`), or 'learned'
  (improved DDPM's interpolation, respaced). None: 'learned' when
  learned_variance (the model outputs [prediction, v], 2C channels), else
  'small'. A learned-variance model may still sample with a fixed variance.
  Same conventions and return values as `ddim_sample`; no noise is added at
  the last step (k = 0), which returns the posterior mean.
  """
  variance = resolve_ddpm_variance(variance, learned_variance)
  noise_std = None if variance == "learned" else jnp.sqrt(fixed_variances(schedule, variance))
  return ancestral_sample(
    model_fn,
    schedule,
    noise_std=noise_std,
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


def ddim_invert(
  model_fn: ModelFn,
  schedule: Schedule,
  x0: jax.Array,
  *,
  parameterization: str,
  learned_variance: bool = False,
  fixed_point_iterations: int = 0,
) -> jax.Array:
  """Runs the deterministic DDIM ODE forwards: data x0 [B, ...] -> x_T [B, ...].

  Step k = 0 ... K-1 undoes sampling step k, moving from alpha_bar_prev[k]
  to alpha_bar[k] along the model's eps: x0' = (x - sqrt(1 - abar_prev) eps)
  / sqrt(abar_prev), then x = sqrt(abar) x0' + sqrt(1 - abar) eps. eps comes
  first from the current state at step k-1 (guided-diffusion's reverse DDIM),
  then each of `fixed_point_iterations` re-evaluates it at the new state and
  step k, converging to the exact inverse of the eta=0 sampler step (one
  model call each; 2-3 make `ddim_sample` reconstruct x0 far more closely).
  x_T sits at alpha_bar[K-1], where `ddim_sample` starts.
  """
  def eps_at(x, k):
    prediction = model_prediction(model_fn, schedule, x, k, learned_variance)
    t = jnp.full(x.shape[:1], k, dtype=jnp.int32)
    return split_prediction(schedule, prediction, x, t, parameterization)[1]

  def body(x_prev, k):
    t = jnp.full(x_prev.shape[:1], k, dtype=jnp.int32)
    alpha_bar = coefficient(schedule.alphas_cumprod, t, x_prev)
    alpha_bar_prev = coefficient(schedule.alphas_cumprod_prev, t, x_prev)

    def step_from(eps):
      pred_x0 = (x_prev - jnp.sqrt(1.0 - alpha_bar_prev) * eps) / jnp.sqrt(alpha_bar_prev)
      return jnp.sqrt(alpha_bar) * pred_x0 + jnp.sqrt(1.0 - alpha_bar) * eps

    x = step_from(eps_at(x_prev, jnp.maximum(k - 1, 0)))
    x = jax.lax.fori_loop(
      0, fixed_point_iterations, lambda _, x: step_from(eps_at(x, k)), x
    )
    return x, None

  steps = jnp.arange(schedule.num_timesteps, dtype=jnp.int32)
  x_T, _ = jax.lax.scan(body, jnp.asarray(x0, dtype=jnp.float32), steps)
  return x_T
