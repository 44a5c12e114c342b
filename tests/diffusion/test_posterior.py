"""The true posterior, the model's reverse step and x0 thresholding."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from unclip_jax import diffusion

SCHEDULE = diffusion.make_schedule("linear", 200)
T_INDEX = jnp.array([0, 1, 100, 199], dtype=jnp.int32)


q_posterior = jax.jit(functools.partial(diffusion.q_posterior_mean_variance, SCHEDULE))


@functools.partial(jax.jit, static_argnames=("learned_variance", "clip_denoised"))
def p_mean_variance(output, x_t, *, learned_variance, clip_denoised=False):
  return diffusion.p_mean_variance(
    SCHEDULE, output, x_t, T_INDEX, parameterization="x0",
    learned_variance=learned_variance, clip_denoised=clip_denoised,
  )


def _inputs(shape=(4, 3, 2)):
  rng = np.random.default_rng(1)
  return rng.uniform(-1, 1, shape).astype(np.float32), rng.normal(size=shape).astype(np.float32)


def test_q_posterior_matches_closed_form():
  x0, x_t = _inputs()
  mean, variance, log_variance = q_posterior(x0, x_t, T_INDEX)
  betas = diffusion.linear_betas(200)
  abar = np.cumprod(1 - betas)
  abar_prev = np.append(1.0, abar[:-1])
  k = np.asarray(T_INDEX)
  expected_mean = (
    (np.sqrt(abar_prev) * betas / (1 - abar))[k, None, None] * np.asarray(x0)
    + (np.sqrt(1 - betas) * (1 - abar_prev) / (1 - abar))[k, None, None] * np.asarray(x_t)
  )
  expected_variance = betas * (1 - abar_prev) / (1 - abar)
  np.testing.assert_allclose(mean, expected_mean, rtol=1e-5, atol=1e-6)
  assert variance.shape == (4, 1, 1)
  np.testing.assert_allclose(variance[:, 0, 0], expected_variance[k], rtol=1e-5, atol=1e-12)
  # Step 0 has zero variance; its log is clipped to step 1's.
  np.testing.assert_allclose(log_variance[1:, 0, 0], np.log(expected_variance[k[1:]]), rtol=1e-5)
  np.testing.assert_allclose(log_variance[0, 0, 0], np.log(expected_variance[1]), rtol=1e-5)


def test_p_mean_variance_fixed_and_learned():
  x0, x_t = _inputs()
  fixed = p_mean_variance(x0, x_t, learned_variance=False)
  true_mean, true_variance, _ = q_posterior(x0, x_t, T_INDEX)
  np.testing.assert_allclose(fixed.mean, true_mean, rtol=1e-6)
  np.testing.assert_allclose(fixed.variance, jnp.broadcast_to(true_variance, x0.shape), rtol=1e-6)
  np.testing.assert_allclose(fixed.pred_x0, x0)
  for v, expected in [
    (-1.0, SCHEDULE.posterior_log_variance_clipped[T_INDEX]),
    (1.0, jnp.log(SCHEDULE.betas[T_INDEX])),
  ]:
    output = jnp.concatenate([x0, jnp.full_like(x0, v)], axis=-1)
    learned = p_mean_variance(output, x_t, learned_variance=True)
    assert learned.log_variance.shape == x0.shape
    np.testing.assert_allclose(learned.log_variance[:, 0, 0], expected, rtol=1e-5)
    np.testing.assert_allclose(learned.mean, true_mean, rtol=1e-6)


def test_p_mean_variance_clips_pred_x0():
  _, x_t = _inputs()
  out = p_mean_variance(3 * x_t, x_t, learned_variance=False, clip_denoised=True)
  assert float(jnp.max(jnp.abs(out.pred_x0))) <= 1.0


def test_static_clip_and_dynamic_threshold():
  x = np.array([[0.5, -0.2, 0.9, -0.7], [4.0, -2.0, 1.0, 0.5]], np.float32)
  np.testing.assert_allclose(diffusion.static_clip(x)[1], [1.0, -1.0, 1.0, 0.5])
  out = np.asarray(jax.jit(diffusion.dynamic_threshold, static_argnums=1)(x, 75.0))
  # Example 0 lies inside [-1, 1]: s = 1, unchanged.
  np.testing.assert_allclose(out[0], x[0])
  s = max(1.0, np.percentile(np.abs(x[1]), 75.0))
  np.testing.assert_allclose(out[1], np.clip(x[1], -s, s) / s, rtol=1e-6)
  assert np.abs(out).max() <= 1.0
  images = np.random.default_rng(0).normal(size=(3, 4, 4, 3)).astype(np.float32) * 3
  thresholded = jax.jit(diffusion.dynamic_threshold, static_argnums=1)(images, 99.5)
  assert thresholded.shape == images.shape and float(jnp.max(jnp.abs(thresholded))) <= 1.0
  with pytest.raises(ValueError, match="percent"):
    diffusion.dynamic_threshold(x, 0.0)
