"""KL and likelihood closed forms; the simple and hybrid training losses."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from unclip_jax import diffusion

SCHEDULE = diffusion.make_schedule("cosine", 100)
T = SCHEDULE.num_timesteps
SHAPE = (4, 2, 2, 3)  # tiny images [B, H, W, C]


def _images(seed=0):
  # 8-bit values mapped to [-1, 1], the decoder NLL's data.
  pixels = np.random.default_rng(seed).integers(0, 256, SHAPE)
  return (pixels / 127.5 - 1.0).astype(np.float32)


def _linear_model(params, x_t, t):
  """Mean channels depend only on params['mean'], variance channels on params['var']."""
  del t
  return jnp.concatenate([params["mean"] * x_t, jnp.tanh(params["var"] * x_t)], axis=-1)


def test_normal_kl_closed_form():
  mean1, logvar1, mean2, logvar2 = 0.3, np.log(0.5), -0.2, np.log(2.0)
  expected = np.log(np.sqrt(2.0) / np.sqrt(0.5)) + (0.5 + 0.25) / (2 * 2.0) - 0.5
  kl = diffusion.normal_kl(mean1, logvar1, mean2, logvar2)
  np.testing.assert_allclose(kl, expected, rtol=1e-6)
  assert float(diffusion.normal_kl(0.4, 0.1, 0.4, 0.1)) == pytest.approx(0.0, abs=1e-7)


@pytest.mark.parametrize("mean,log_scale", [(0.0, -2.0), (0.9, -4.0), (-1.0, 0.5)])
def test_discretized_likelihood_sums_to_one_over_all_bins(mean, log_scale):
  bins = np.linspace(-1.0, 1.0, 256, dtype=np.float32)
  log_likelihood = jax.jit(diffusion.discretized_gaussian_log_likelihood)(
    bins, means=np.full(256, mean, np.float32), log_scales=np.full(256, log_scale, np.float32)
  )
  assert np.all(np.isfinite(log_likelihood))
  np.testing.assert_allclose(float(jnp.sum(jnp.exp(log_likelihood))), 1.0, atol=1e-4)


def test_mse_loss_is_per_example():
  prediction = np.zeros((3, 2, 2), np.float32)
  target = np.stack([np.zeros((2, 2)), np.ones((2, 2)), 2 * np.ones((2, 2))]).astype(np.float32)
  np.testing.assert_allclose(diffusion.mse_loss(prediction, target), [0.0, 1.0, 4.0])


@pytest.mark.parametrize("parameterization", ["eps", "x0", "v"])
def test_exact_model_has_zero_simple_loss(parameterization):
  x0 = _images()
  t = np.array([0, 5, 50, T - 1], np.int32)
  noise = np.random.default_rng(1).normal(size=SHAPE).astype(np.float32)
  target = diffusion.training_target(SCHEDULE, x0, t, noise, parameterization)
  loss, aux = jax.jit(
    lambda x0, t, noise: diffusion.training_losses_at(
      SCHEDULE, lambda x_t, t: target, x0, t, noise, parameterization=parameterization
    )
  )(x0, t, noise)
  assert loss.shape == (4,)
  np.testing.assert_allclose(loss, 0.0, atol=1e-10)
  np.testing.assert_array_equal(aux["t"], t)


def test_vlb_is_zero_for_the_true_posterior():
  # An x0 model that knows x0 and outputs v = -1 (the posterior variance) has KL 0 for t > 0.
  x0 = _images()
  t = np.array([1, 10, 50, T - 1], np.int32)

  @jax.jit
  def vlb_fn(x0, t):
    x_t = diffusion.q_sample(SCHEDULE, x0, t, jnp.ones(SHAPE))
    output = jnp.concatenate([x0, -jnp.ones(SHAPE)], axis=-1)
    return diffusion.variational_bound_terms(
      SCHEDULE, output, x0=x0, x_t=x_t, t=t, parameterization="x0", learned_variance=True
    )

  vlb = vlb_fn(x0, t)
  np.testing.assert_allclose(vlb, 0.0, atol=1e-4)


@functools.partial(jax.jit, static_argnames=("learned_variance",))
def _loss_and_grad(params, x0, t, noise, *, learned_variance):
  def mean_loss(params):
    def model_fn(x_t, t):
      output = _linear_model(params, x_t, t)
      return output if learned_variance else output[..., : SHAPE[-1]]

    loss, aux = diffusion.training_losses_at(
      SCHEDULE, model_fn, x0, t, noise, parameterization="eps",
      learned_variance=learned_variance,
    )
    return jnp.mean(loss), aux

  return jax.value_and_grad(mean_loss, has_aux=True)(params)


def test_hybrid_loss_vlb_only_trains_the_variance():
  params = {"mean": jnp.float32(0.7), "var": jnp.float32(0.3)}
  x0 = _images()
  t = np.array([0, 1, 40, T - 1], np.int32)
  noise = np.random.default_rng(2).normal(size=SHAPE).astype(np.float32)
  (hybrid, aux), hybrid_grads = _loss_and_grad(params, x0, t, noise, learned_variance=True)
  (simple, _), simple_grads = _loss_and_grad(params, x0, t, noise, learned_variance=False)
  assert np.isfinite(float(hybrid)) and float(hybrid) > float(simple)
  assert np.all(np.isfinite(aux["vlb"])) and aux["vlb"].shape == (4,)
  np.testing.assert_allclose(hybrid_grads["mean"], simple_grads["mean"], rtol=1e-5)
  assert float(simple_grads["var"]) == 0.0
  assert np.isfinite(float(hybrid_grads["var"])) and float(hybrid_grads["var"]) != 0.0


@pytest.mark.parametrize("variance_value", [0.0, 1.0, -1.0, 50.0, -50.0])
def test_learned_variance_loss_finite_at_both_ends(variance_value):
  x0 = _images()
  t = np.array([0, 0, T - 1, T - 1], np.int32)
  noise = np.random.default_rng(3).normal(size=SHAPE).astype(np.float32)
  # A model far outside v in [-1, 1] must still give finite values and gradients.
  params = {"mean": jnp.float32(0.5), "var": jnp.float32(variance_value)}
  (loss, aux), grads = _loss_and_grad(params, x0, t, noise, learned_variance=True)
  assert np.isfinite(float(loss)) and np.all(np.isfinite(aux["vlb"]))
  assert all(np.isfinite(float(g)) for g in jax.tree.leaves(grads))


def test_training_losses_samples_t_and_noise_from_rng():
  x0 = _images()
  model_fn = lambda x_t, t: 0.5 * x_t  # noqa: E731
  run = jax.jit(
    lambda rng: diffusion.training_losses(SCHEDULE, model_fn, x0, rng, parameterization="eps")
  )
  loss_a, aux_a = run(jax.random.PRNGKey(0))
  loss_b, _ = run(jax.random.PRNGKey(0))
  loss_c, _ = run(jax.random.PRNGKey(1))
  assert loss_a.shape == (4,) and np.all(np.isfinite(loss_a))
  np.testing.assert_array_equal(loss_a, loss_b)
  assert not np.allclose(loss_a, loss_c)
  assert np.all((aux_a["t"] >= 0) & (aux_a["t"] < T))
