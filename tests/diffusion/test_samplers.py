"""Samplers against exact oracles and an independent numpy DDIM; guidance; compilation."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from unclip_jax import diffusion

FULL = diffusion.make_schedule("cosine", 1000)
SPACED = diffusion.respace(FULL, 10)
SHAPE = (2, 2, 2, 3)  # tiny images [B, H, W, C]
X_STAR = np.linspace(-0.9, 0.8, math.prod(SHAPE), dtype=np.float32).reshape(SHAPE)


def _point_oracle(x_t, t):
  """The exact x0 prediction when the data is the single point X_STAR."""
  del t
  return jnp.broadcast_to(X_STAR, x_t.shape)


def _linear_eps_model(x_t, t):
  """A simple linear eps model; its dependence on t checks that models see ORIGINAL steps."""
  return x_t * (0.5 - diffusion.per_example(t, x_t) / 4000.0)


def _numpy_cosine_alpha_bar(T=1000, s=0.008):
  f = lambda u: math.cos((u + s) / (1 + s) * math.pi / 2) ** 2  # noqa: E731
  betas = np.array([min(1 - f((k + 1) / T) / f(k / T), 0.999) for k in range(T)])
  return np.cumprod(1 - betas)


def _numpy_eps(x, original_t):
  return x * (0.5 - original_t / 4000.0)


def _numpy_spaced():
  kept = np.round(np.linspace(0, 999, 10)).astype(int)
  alpha_bar = _numpy_cosine_alpha_bar()[kept]
  return kept, alpha_bar, np.append(1.0, alpha_bar[:-1])


def test_exact_point_oracle_ends_at_the_point():
  learned = lambda x, t: jnp.concatenate([_point_oracle(x, t), jnp.zeros_like(x)], -1)  # noqa: E731
  common = dict(shape=SHAPE, parameterization="x0")

  @jax.jit
  def samples(rng):
    return dict(
      ddim=diffusion.ddim_sample(_point_oracle, SPACED, rng=rng, **common),
      ddim_eta1=diffusion.ddim_sample(_point_oracle, SPACED, rng=rng, eta=1.0, **common),
      ddpm=diffusion.ddpm_sample(_point_oracle, SPACED, rng=rng, **common),
      ddpm_learned=diffusion.ddpm_sample(
        learned, SPACED, rng=rng, learned_variance=True, **common
      ),
    )

  for name, sample in samples(jax.random.PRNGKey(0)).items():
    np.testing.assert_allclose(sample, X_STAR, atol=1e-5, err_msg=name)


def test_ddim_matches_numpy_trajectory():
  x_T = np.random.default_rng(0).normal(size=SHAPE).astype(np.float32)
  sample, trajectory = jax.jit(
    lambda x_T: diffusion.ddim_sample(
      _linear_eps_model, SPACED, x_T=x_T, parameterization="eps", return_trajectory=True
    )
  )(x_T)
  kept, alpha_bar, alpha_bar_prev = _numpy_spaced()
  x = x_T.astype(np.float64)
  expected = [x]
  for k in reversed(range(10)):
    eps = _numpy_eps(x, kept[k])
    x0 = (x - np.sqrt(1 - alpha_bar[k]) * eps) / np.sqrt(alpha_bar[k])
    x = np.sqrt(alpha_bar_prev[k]) * x0 + np.sqrt(1 - alpha_bar_prev[k]) * eps
    expected.append(x)
  assert trajectory.shape == (11,) + SHAPE
  np.testing.assert_allclose(trajectory, np.stack(expected), rtol=1e-4, atol=1e-6)
  np.testing.assert_array_equal(sample, trajectory[-1])


def test_ddim_invert_matches_numpy():
  x0 = X_STAR
  x_T = jax.jit(
    lambda x0: diffusion.ddim_invert(_linear_eps_model, SPACED, x0, parameterization="eps")
  )(x0)
  kept, alpha_bar, alpha_bar_prev = _numpy_spaced()
  x = x0.astype(np.float64)
  for k in range(10):
    eps = _numpy_eps(x, kept[max(k - 1, 0)])
    pred_x0 = (x - np.sqrt(1 - alpha_bar_prev[k]) * eps) / np.sqrt(alpha_bar_prev[k])
    x = np.sqrt(alpha_bar[k]) * pred_x0 + np.sqrt(1 - alpha_bar[k]) * eps
  np.testing.assert_allclose(x_T, x, rtol=1e-4, atol=1e-6)


def _gaussian_oracle(parameterization, mean=0.3, std=0.5):
  """The exact model for data ~ N(mean, std^2) per dimension, trained on FULL."""
  def model_fn(x_t, t):
    alpha_bar = diffusion.per_example(FULL.alphas_cumprod[t], x_t)
    eps = jnp.sqrt(1 - alpha_bar) * (x_t - jnp.sqrt(alpha_bar) * mean) / (
      alpha_bar * std**2 + 1 - alpha_bar
    )
    x0 = diffusion.predict_x0_from_eps(FULL, x_t, t, eps)
    return diffusion.training_target(FULL, x0, t, eps, parameterization)

  return model_fn


@pytest.mark.parametrize("parameterization", ["eps", "x0", "v"])
def test_ddim_invert_then_sample_reconstructs(parameterization):
  schedule = diffusion.respace(FULL, 50)
  model_fn = _gaussian_oracle(parameterization)

  @jax.jit
  def round_trip(x0):
    errors = []
    for iterations in (0, 3):
      x_T = diffusion.ddim_invert(
        model_fn, schedule, x0, parameterization=parameterization,
        fixed_point_iterations=iterations,
      )
      back = diffusion.ddim_sample(
        model_fn, schedule, x_T=x_T, parameterization=parameterization
      )
      errors.append(jnp.max(jnp.abs(back - x0)))
    return errors

  plain_error, refined_error = round_trip(X_STAR)
  assert float(plain_error) < 0.1
  assert float(refined_error) < 2e-3
  assert float(refined_error) < float(plain_error)


def test_same_rng_same_sample_and_clipping():
  @jax.jit
  def samples(rng):
    big_x0 = lambda x_t, t: 3.0 * x_t  # noqa: E731  # predictions far outside [-1, 1]
    return dict(
      ddpm=diffusion.ddpm_sample(
        big_x0, SPACED, shape=SHAPE, rng=rng, parameterization="x0", clip_denoised=True
      ),
      ddim=diffusion.ddim_sample(
        big_x0, SPACED, shape=SHAPE, rng=rng, parameterization="x0", eta=0.5,
        threshold_percentile=99.5,
      ),
    )

  first, again, other = (samples(jax.random.PRNGKey(seed)) for seed in (0, 0, 1))
  for name in ("ddpm", "ddim"):
    np.testing.assert_array_equal(first[name], again[name])
    assert not np.allclose(first[name], other[name])
    assert float(jnp.max(jnp.abs(first[name]))) <= 1.0 + 1e-6


def _conditional_model(calls):
  def model_fn(x_t, t, drop_condition):
    calls.append(x_t.shape[0])
    cond = jnp.concatenate([2.0 * x_t + 1.0, jnp.full_like(x_t, 0.25)], -1)
    uncond = jnp.concatenate([0.5 * x_t, jnp.full_like(x_t, -0.75)], -1)
    return jnp.where(diffusion.per_example(drop_condition, cond), uncond, cond)

  return model_fn


def test_guided_combines_conditional_and_unconditional():
  x = np.random.default_rng(0).normal(size=(3, 4)).astype(np.float32)
  t = np.zeros(3, np.int32)
  calls = []
  plain = diffusion.guided(_conditional_model(calls), 1.0)(x, t)
  assert calls == [3]  # scale 1: no doubled batch
  np.testing.assert_allclose(plain[:, :4], 2 * x + 1, rtol=1e-6)
  guided = diffusion.guided(_conditional_model(calls), 3.0, learned_variance=True)(x, t)
  assert calls[-1] == 6  # one call on the concatenated batch
  cond, uncond = 2 * x + 1, 0.5 * x
  np.testing.assert_allclose(guided[:, :4], uncond + 3.0 * (cond - uncond), rtol=1e-5)
  np.testing.assert_allclose(guided[:, 4:], 0.25)  # variance from the conditional half
  condition = np.arange(3.0)
  np.testing.assert_array_equal(diffusion.match_batch(condition, 6), np.tile(condition, 2))


def test_samplers_compile_to_one_loop():
  calls = []
  model_fn = diffusion.guided(_conditional_model(calls), 2.0, learned_variance=True)

  def sample(rng):
    return diffusion.ddim_sample(
      model_fn, SPACED, shape=(2, 4), rng=rng, parameterization="eps", learned_variance=True
    )

  rng = jax.random.PRNGKey(0)
  jax.jit(sample).lower(rng).compile()
  assert calls == [4]  # the model is traced once (on the doubled batch), not once per step
  jaxpr = str(jax.make_jaxpr(sample)(rng))
  assert "scan" in jaxpr or "while" in jaxpr
  for fn in (
    lambda rng: diffusion.ddpm_sample(
      model_fn, SPACED, shape=(2, 4), rng=rng, parameterization="eps", learned_variance=True
    ),
    lambda rng: diffusion.ddim_invert(
      model_fn, SPACED, jnp.zeros((2, 4)), parameterization="eps", learned_variance=True
    ),
  ):
    assert "scan" in str(jax.make_jaxpr(fn)(rng))
