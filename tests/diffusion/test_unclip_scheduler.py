"""Our DDPM sampler over a respaced cosine schedule is Karlo's sampler: diffusers'
UnCLIPScheduler step for step, fed the same x_T and per-step noise.

Our own schedules are computed in float64; diffusers' in float32, which differs
at the last step (t = 0 -> the sample), where the posterior mean is x0 times
beta_0 / (1 - alpha_bar_0): exactly 1 in float64, about 1 + 4e-4 in float32.
`unclip_scheduler_schedule` rounds as diffusers does; `respace` matches every
step but that one.
"""
import numpy as np
import pytest

import jax
import jax.numpy as jnp

from unclip_jax import diffusion

torch = pytest.importorskip("torch")
scheduling_unclip = pytest.importorskip("diffusers.schedulers.scheduling_unclip")

T = 1000


@pytest.mark.parametrize("variance_type,prediction,clip_range,steps", [
    ("fixed_small_log", "sample", 5.0, 25),  # Karlo's prior
    ("learned_range", "epsilon", 1.0, 25),  # Karlo's decoder
    ("fixed_small_log", "epsilon", 1.0, 7),  # Karlo's super-resolution
])
def test_ddpm_matches_unclip_scheduler(monkeypatch, variance_type, prediction,
                                       clip_range, steps):
  rng = np.random.default_rng(0)
  channels = 3
  x_T = rng.standard_normal((2, channels)).astype(np.float32)
  noises = rng.standard_normal((steps, 2, channels)).astype(np.float32)
  learned = variance_type == "learned_range"
  variance_out = rng.uniform(-1, 1, (2, channels)).astype(np.float32)

  # Theirs, its random draws replaced by ours in order.
  draws = iter(noises)
  monkeypatch.setattr(scheduling_unclip, "randn_tensor",
                      lambda shape, **kw: torch.from_numpy(next(draws)))
  scheduler = scheduling_unclip.UnCLIPScheduler(
      num_train_timesteps=T, variance_type=variance_type, clip_sample=True,
      clip_sample_range=clip_range, prediction_type=prediction)
  scheduler.set_timesteps(steps)
  timesteps = scheduler.timesteps.numpy()
  x, theirs = torch.from_numpy(x_T), []
  for i, t in enumerate(timesteps):
    out = 0.7 * x * np.float32(np.cos(t * 0.003)) + 0.1
    if learned:
      out = torch.cat([out, torch.from_numpy(variance_out)], dim=1)
    prev = None if i + 1 == len(timesteps) else int(timesteps[i + 1])
    x = scheduler.step(out, int(t), x, prev_timestep=prev).prev_sample
    theirs.append(x.numpy())

  # Ours, rounded as diffusers rounds (all steps) and in float64 (all but the last).
  schedule = diffusion.unclip_scheduler_schedule(T, steps)
  ours64 = diffusion.respace(diffusion.make_schedule("cosine", T), steps)
  np.testing.assert_array_equal(np.asarray(schedule.timesteps)[::-1], timesteps)
  np.testing.assert_array_equal(schedule.timesteps, ours64.timesteps)

  def model_fn(x, t):
    out = 0.7 * x * jnp.cos(t * 0.003)[:, None] + 0.1
    return jnp.concatenate([out, variance_out], -1) if learned else out

  def run(schedule):
    _, trajectory = diffusion.ddpm_sample(
        model_fn, schedule, rng=jax.random.key(0),
        parameterization="x0" if prediction == "sample" else "eps",
        variance="learned" if learned else "small", learned_variance=learned,
        clip_denoised=clip_range, x_T=x_T, step_noise=noises,
        return_trajectory=True)
    return np.asarray(trajectory)[1:]
  np.testing.assert_allclose(run(schedule), theirs, rtol=1e-5, atol=1e-5)
  ours64 = run(ours64)
  np.testing.assert_allclose(ours64[:-1], theirs[:-1], rtol=1e-4, atol=1e-5)
  their_factor = (scheduler.betas[0] / (1 - scheduler.alphas_cumprod[0])).item()
  assert abs(their_factor - 1) > 1e-4  # the difference the docstring explains
  np.testing.assert_allclose(ours64[-1] * their_factor, theirs[-1], rtol=1e-4,
                             atol=1e-5)


def test_step_noise_shape_is_checked():
  schedule = diffusion.respace(diffusion.make_schedule("cosine", T), 4)
  with pytest.raises(ValueError, match="step_noise has shape"):
    diffusion.ddpm_sample(lambda x, t: x, schedule, rng=jax.random.key(0),
                          parameterization="eps", x_T=np.zeros((2, 3), np.float32),
                          step_noise=np.zeros((3, 2, 3), np.float32))


def test_step_noise_replaces_the_draws():
  """The same noise given explicitly gives the same sample as drawing it."""
  schedule = diffusion.respace(diffusion.make_schedule("cosine", T), 5)
  x_T = np.ones((2, 3), np.float32)
  run = lambda noise, rng: diffusion.ddim_sample(
      lambda x, t: 0.5 * x, schedule, rng=rng, parameterization="eps", eta=1.0,
      x_T=x_T, step_noise=noise)
  zero = run(np.zeros((5, 2, 3), np.float32), jax.random.key(1))
  assert not np.allclose(run(None, jax.random.key(1)), zero)
  np.testing.assert_array_equal(zero, run(np.zeros((5, 2, 3), np.float32),
                                          jax.random.key(2)))
