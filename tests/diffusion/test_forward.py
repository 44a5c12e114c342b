"""q_sample moments and the eps / x0 / v conversions."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from unclip_jax import diffusion

SCHEDULE = diffusion.make_schedule("cosine", 1000)
MID_STEPS = np.array([20, 300, 600, 900], dtype=np.int32)
END_STEPS = np.array([0, 1, 998, 999], dtype=np.int32)


@jax.jit
def _conversions(x0, eps, t):
  """Every conversion at once: one compile per input shape instead of many eager ops."""
  x_t = diffusion.q_sample(SCHEDULE, x0, t, eps)
  v = diffusion.v_from_x0_eps(SCHEDULE, x0, t, eps)
  out = dict(
    x0_from_eps=diffusion.predict_x0_from_eps(SCHEDULE, x_t, t, eps),
    eps_from_x0=diffusion.predict_eps_from_x0(SCHEDULE, x_t, t, x0),
    x0_from_v=diffusion.x0_from_v(SCHEDULE, x_t, t, v),
    eps_from_v=diffusion.eps_from_v(SCHEDULE, x_t, t, v),
  )
  for name in diffusion.PARAMETERIZATIONS:
    target = diffusion.training_target(SCHEDULE, x0, t, eps, name)
    out[f"split_{name}"] = diffusion.split_prediction(SCHEDULE, target, x_t, t, name)
  return out


def _random_pair(shape):
  rng = np.random.default_rng(0)
  return rng.uniform(-1, 1, shape).astype(np.float32), rng.normal(size=shape).astype(np.float32)


@pytest.mark.parametrize("step", [0, 250, 700, 999])
def test_q_sample_moments(step):
  num_samples, x0_row = 20000, np.array([0.8, -0.5, 0.1], np.float32)
  x0 = np.broadcast_to(x0_row, (num_samples, 3))
  t = np.full((num_samples,), step, dtype=np.int32)
  noise = np.random.default_rng(step).normal(size=x0.shape).astype(np.float32)
  x_t = np.asarray(jax.jit(diffusion.q_sample)(SCHEDULE, x0, t, noise), np.float64)
  abar = float(SCHEDULE.alphas_cumprod[step])
  std = np.sqrt(1 - abar)
  np.testing.assert_allclose(
    x_t.mean(0), np.sqrt(abar) * x0_row, atol=5 * std / np.sqrt(num_samples) + 1e-6
  )
  np.testing.assert_allclose(x_t.var(0), np.full(3, 1 - abar), rtol=0.05, atol=1e-9)


def test_per_example_broadcasts_any_trailing_shape():
  values = jnp.arange(4.0)
  assert diffusion.per_example(values, jnp.zeros((4, 7))).shape == (4, 1)
  assert diffusion.per_example(values, jnp.zeros((4, 2, 3, 5))).shape == (4, 1, 1, 1)
  assert diffusion.per_example(jnp.float32(2.0), jnp.zeros((4, 2))).shape == (4, 1)


@pytest.mark.parametrize("shape", [(4, 6), (4, 2, 2, 3)])
def test_parameterisation_round_trips(shape):
  # Mid-range steps: at the ends eps<->x0 divides by a number near 0 in float32.
  x0, eps = _random_pair(shape)
  out = _conversions(x0, eps, MID_STEPS)
  tol = dict(atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(out["x0_from_eps"], x0, **tol)
  np.testing.assert_allclose(out["eps_from_x0"], eps, atol=1e-4)
  np.testing.assert_allclose(out["x0_from_v"], x0, **tol)
  np.testing.assert_allclose(out["eps_from_v"], eps, **tol)
  for name in diffusion.PARAMETERIZATIONS:
    pred_x0, pred_eps = out[f"split_{name}"]
    np.testing.assert_allclose(pred_x0, x0, atol=1e-5)
    np.testing.assert_allclose(pred_eps, eps, atol=1e-4)


def test_v_conversions_are_well_conditioned_at_the_ends():
  x0, eps = _random_pair((4, 6))
  out = _conversions(x0, eps, END_STEPS)
  np.testing.assert_allclose(out["x0_from_v"], x0, atol=1e-5)
  np.testing.assert_allclose(out["eps_from_v"], eps, atol=1e-5)


def test_unknown_parameterization_raises():
  x = jnp.zeros((2, 3))
  with pytest.raises(ValueError, match="parameterization"):
    diffusion.split_prediction(SCHEDULE, x, x, jnp.zeros(2, jnp.int32), "score")
