"""Every sampler against Gaussian data, where the exact eps predictor is known.

Data x0 ~ N(MU, S2 I) in D dims. For x_t = sqrt(abar) x0 + sqrt(1 - abar) eps,
E[eps | x_t] = sqrt(1 - abar) (x_t - sqrt(abar) MU) / (abar S2 + 1 - abar): the
model below. Every reverse step is then linear-Gaussian, so `_exact_moments`
propagates each sampler's mean and variance exactly (float64 numpy, written
from the papers' formulas, not from the module); Monte Carlo samples of the
module's samplers must agree with it, and both must approach (MU, S2).
"""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from unclip_jax import diffusion

FULL = diffusion.make_schedule("cosine", 1000)
D = 16
MU = np.linspace(-0.5, 0.5, D)
S2 = 0.25
NUM_SAMPLES = 4096  # x D = 65536 draws per dimension-pooled moment
LEARNED_V = 0.0  # the "learned" model's constant interpolation: geometric mean of small and large
# (name, sampler, options, model outputs a variance channel)
CASES = [
  ("ddim eta=0", "ddim", dict(eta=0.0), False),
  ("ddim eta=1", "ddim", dict(eta=1.0), False),
  ("ddpm small", "ddpm", dict(variance="small"), False),
  ("ddpm large", "ddpm", dict(variance="large"), False),
  ("ddpm learned", "ddpm", dict(variance="learned"), True),
  ("analytic", "analytic", dict(), False),
]


def _oracle(parameterization="eps", learned=False):
  """The exact model trained on FULL, in any parameterisation, optionally with a v channel."""
  def model_fn(x_t, t):
    alpha_bar = diffusion.per_example(FULL.alphas_cumprod[t], x_t)
    eps = jnp.sqrt(1 - alpha_bar) * (x_t - jnp.sqrt(alpha_bar) * MU) / (
      alpha_bar * S2 + 1 - alpha_bar
    )
    x0 = diffusion.predict_x0_from_eps(FULL, x_t, t, eps)
    output = diffusion.training_target(FULL, x0, t, eps, parameterization)
    if learned:
      output = jnp.concatenate([output, jnp.full_like(output, LEARNED_V)], -1)
    return output

  return model_fn


def _exact_gamma(alpha_bar):
  """E||E[eps | x_t]||^2 / d for the Gaussian data."""
  return (1 - alpha_bar) / (alpha_bar * S2 + 1 - alpha_bar)


def _numpy_alpha_bar(T=1000, s=0.008):
  f = lambda u: math.cos((u + s) / (1 + s) * math.pi / 2) ** 2  # noqa: E731
  betas = np.array([min(1 - f((k + 1) / T) / f(k / T), 0.999) for k in range(T)])
  return np.cumprod(1 - betas)


def _paper_variance(abar_t, abar_s, gamma):
  """Analytic-DPM Theorem 1 written literally, lambda^2 = beta_tilde."""
  alpha = abar_t / abar_s
  lam2 = (1 - alpha) * (1 - abar_s) / (1 - abar_t)
  bracket = math.sqrt((1 - abar_t) / alpha) - math.sqrt(1 - abar_s - lam2)
  return lam2 + bracket**2 * (1 - gamma)


def _exact_moments(name, num_steps, analytic_variances=None):
  """Mean [D] and variance of the sampler's output, propagated exactly from x_T ~ N(0, I)."""
  kept = np.round(np.linspace(0, 999, num_steps)).astype(int)
  abar = _numpy_alpha_bar()[kept]
  abar_prev = np.append(1.0, abar[:-1])
  mean, var = np.zeros(D), 1.0
  for k in reversed(range(num_steps)):
    a_t, a_s = abar[k], abar_prev[k]
    beta = 1 - a_t / a_s
    beta_tilde = beta * (1 - a_s) / (1 - a_t)
    gain = math.sqrt(1 - a_t) / (a_t * S2 + 1 - a_t)  # eps_hat = gain (x - sqrt(a_t) MU)

    def step(x, k=k, a_t=a_t, a_s=a_s, beta=beta, beta_tilde=beta_tilde, gain=gain):
      eps = gain * (x - math.sqrt(a_t) * MU)
      x0 = (x - math.sqrt(1 - a_t) * eps) / math.sqrt(a_t)
      if name.startswith("ddim"):
        eta = float(name[-1])
        noise_var = eta**2 * (1 - a_s) / (1 - a_t) * (1 - a_t / a_s)
        return math.sqrt(a_s) * x0 + math.sqrt(1 - a_s - noise_var) * eps, noise_var
      mean = beta * math.sqrt(a_s) / (1 - a_t) * x0 + (1 - a_s) * math.sqrt(1 - beta) / (
        1 - a_t
      ) * x
      if name == "ddpm small":
        return mean, beta_tilde
      if name == "ddpm large":
        return mean, beta
      if name == "ddpm learned" and k > 0:  # step 0 adds no noise
        fraction = (LEARNED_V + 1) / 2
        return mean, math.exp(fraction * math.log(beta) + (1 - fraction) * math.log(beta_tilde))
      if name == "analytic":
        return mean, analytic_variances[k]
      return mean, 0.0

    offset, noise_var = step(np.zeros(D))
    gain_x = step(np.ones(D))[0][0] - offset[0]  # the step is affine with the same slope per dim
    mean = step(mean)[0]
    var = gain_x**2 * var + (noise_var if k > 0 else 0.0)
  return mean, var


def _kl_to_data(mean, var):
  """KL(N(mean, var) || N(MU, S2)) per dimension, averaged over dimensions."""
  var = np.broadcast_to(var, (D,))
  return float(np.mean(0.5 * (var / S2 - 1 - np.log(var / S2) + (mean - MU) ** 2 / S2)))


def _data(rng, n=NUM_SAMPLES):
  return MU + math.sqrt(S2) * jax.random.normal(rng, (n, D), dtype=jnp.float32)


@pytest.fixture(scope="module")
def runs():
  """Per step count: eps moments, analytic variances, exact and Monte Carlo moments."""
  out = {}
  for num_steps in (10, 100):
    schedule = diffusion.respace(FULL, num_steps)
    x0 = _data(jax.random.PRNGKey(1), 4 * NUM_SAMPLES)
    # Var(x0 | x_t) <= the data's per-dimension variance (law of total variance).
    bound = float(jnp.mean(jnp.var(x0, axis=0)))

    @jax.jit
    def run(rng, x0):
      gamma = diffusion.estimate_eps_moments(
        _oracle(), schedule, x0, jax.random.PRNGKey(2), parameterization="eps"
      )
      samples = {}
      for name, sampler, options, learned in CASES:
        samples[name] = diffusion.sample(
          sampler, _oracle(learned=learned), schedule, shape=(NUM_SAMPLES, D), rng=rng,
          parameterization="eps", learned_variance=learned, eps_moments=gamma,
          x0_variance_bound=bound, **options,
        )
      variances = diffusion.analytic_variances(schedule, gamma, x0_variance_bound=bound)
      return gamma, variances, samples

    gamma, variances, samples = run(jax.random.PRNGKey(0), x0)
    exact = {
      name: _exact_moments(name, num_steps, np.asarray(variances, np.float64))
      for name, *_ in CASES
    }
    monte_carlo = {
      name: (np.mean(np.asarray(s, np.float64), 0), np.var(np.asarray(s, np.float64), 0))
      for name, s in samples.items()
    }
    out[num_steps] = dict(
      schedule=schedule, gamma=gamma, variances=variances, exact=exact, monte_carlo=monte_carlo
    )
  return out


def test_estimate_eps_moments_matches_closed_form(runs):
  for num_steps, run in runs.items():
    alpha_bar = np.asarray(run["schedule"].alphas_cumprod, np.float64)
    np.testing.assert_allclose(run["gamma"], _exact_gamma(alpha_bar), rtol=0.02, atol=0.002)
  # Images [N, H, W, C] and the x0 / v parameterisations give the same estimate.
  schedule = runs[10]["schedule"]
  x0 = _data(jax.random.PRNGKey(1)).reshape(NUM_SAMPLES // 4, 2, 2, D)
  for parameterization in ("x0", "v"):
    gamma = diffusion.estimate_eps_moments(
      _oracle(parameterization), schedule, x0, jax.random.PRNGKey(2),
      parameterization=parameterization,
    )
    reference = diffusion.estimate_eps_moments(
      _oracle(), schedule, x0, jax.random.PRNGKey(2), parameterization="eps"
    )
    np.testing.assert_allclose(gamma, reference, rtol=1e-3, atol=1e-5)


def test_analytic_variances_are_theorem_1_clipped_by_theorem_2():
  schedule = diffusion.respace(FULL, 10)
  abar = np.asarray(schedule.alphas_cumprod, np.float64)
  abar_prev = np.asarray(schedule.alphas_cumprod_prev, np.float64)
  gamma = _exact_gamma(abar)
  variances = diffusion.analytic_variances(schedule, gamma, x0_variance_bound=None)
  expected = [_paper_variance(abar[k], abar_prev[k], gamma[k]) for k in range(10)]
  # The last step is left out: there 1 - Gamma = 6e-10 is below float32's resolution of Gamma.
  np.testing.assert_allclose(variances[:-1], expected[:-1], rtol=1e-4)
  beta_tilde = np.asarray(schedule.posterior_variance)
  # Gamma > 1 is impossible for an exact model: the variance falls to its lower bound.
  np.testing.assert_allclose(
    diffusion.analytic_variances(schedule, np.full(10, 1.5)), beta_tilde, rtol=1e-6
  )
  # Gamma = 0: Var(x0 | x_t) = bbar / abar, capped at ((b - a) / 2)^2 where larger.
  coef1 = np.asarray(schedule.posterior_mean_coef1)
  capped = diffusion.analytic_variances(schedule, np.zeros(10), x0_variance_bound=0.3)
  x0_variance = np.minimum((1 - abar) / abar, 0.3)
  assert 0 < x0_variance.argmax() < 9  # the cap binds at the noisy steps only
  np.testing.assert_allclose(capped, beta_tilde + coef1**2 * x0_variance, rtol=1e-4)
  with pytest.raises(ValueError, match="10 steps"):
    diffusion.analytic_variances(schedule, np.zeros(9))


@pytest.mark.parametrize("name", [case[0] for case in CASES])
def test_sampler_moments_match_data_and_improve_with_steps(runs, name):
  errors = {}
  for num_steps, run in runs.items():
    exact_mean, exact_var = run["exact"][name]
    mean, var = run["monte_carlo"][name]
    # Monte Carlo standard errors: per-dimension mean sqrt(S2 / N), variance averaged over
    # dimensions S2 sqrt(2 / (N D)).
    np.testing.assert_allclose(mean, exact_mean, atol=5 * math.sqrt(S2 / NUM_SAMPLES))
    variance_error = abs(np.mean(var) - exact_var)
    assert variance_error < 5 * S2 * math.sqrt(2 / (NUM_SAMPLES * D)), (num_steps, var)
    errors[num_steps] = (float(np.max(np.abs(exact_mean - MU))), abs(exact_var - S2))
  # The mean is right for every sampler; the variance error shrinks with steps.
  assert max(errors[10][0], errors[100][0]) < 1e-3
  if name == "analytic":
    # The optimal variance makes every step's marginal exact for Gaussian data: the
    # error (Gamma's Monte Carlo error, no noise at the last step) is tiny at 10 steps.
    assert errors[10][1] < 2e-3 and errors[100][1] < 2e-3, errors
  else:
    assert errors[100][1] < errors[10][1] / 4, errors
    assert errors[100][1] < 0.02, errors


def test_analytic_beats_fixed_variances_at_10_steps(runs):
  run = runs[10]
  exact_kl = {name: _kl_to_data(*run["exact"][name]) for name, *_ in CASES}
  fitted_kl = {name: _kl_to_data(*run["monte_carlo"][name]) for name, *_ in CASES}
  for kl in (exact_kl, fitted_kl):
    for other in ("ddpm small", "ddpm large", "ddpm learned", "ddim eta=0", "ddim eta=1"):
      assert kl["analytic"] < kl[other] / 10, kl
  # The default bound, 1 (images in [-1, 1]), is looser than the data's 0.25 and still exact.
  variances = diffusion.analytic_variances(run["schedule"], run["gamma"])
  default_kl = _kl_to_data(*_exact_moments("analytic", 10, np.asarray(variances, np.float64)))
  assert default_kl < exact_kl["ddpm large"] / 100, default_kl


def test_other_parameterizations_and_dispatch():
  schedule = diffusion.respace(FULL, 10)
  gamma = jnp.asarray(_exact_gamma(np.asarray(schedule.alphas_cumprod, np.float64)))

  @jax.jit
  def samples(rng):
    return {
      (sampler, p): diffusion.sample(
        sampler, _oracle(p), schedule, shape=(8, D), rng=rng, parameterization=p,
        eps_moments=gamma, eta=0.5,
      )
      for sampler in diffusion.SAMPLERS
      for p in diffusion.PARAMETERIZATIONS
    }

  out = samples(jax.random.PRNGKey(0))
  for sampler in diffusion.SAMPLERS:
    for p in ("x0", "v"):
      np.testing.assert_allclose(out[sampler, p], out[sampler, "eps"], atol=2e-3)
  with pytest.raises(ValueError, match="needs eps_moments"):
    diffusion.sample("analytic", _oracle(), schedule, shape=(2, D), rng=jax.random.PRNGKey(0),
                     parameterization="eps")
  with pytest.raises(ValueError, match="expected one of"):
    diffusion.sample("euler", _oracle(), schedule, shape=(2, D), parameterization="eps")
  with pytest.raises(ValueError, match="expected one of"):
    diffusion.ddpm_sample(_oracle(), schedule, shape=(2, D), rng=jax.random.PRNGKey(0),
                          parameterization="eps", variance="huge")
  with pytest.raises(ValueError, match="learned_variance=True"):
    diffusion.ddpm_sample(_oracle(), schedule, shape=(2, D), rng=jax.random.PRNGKey(0),
                          parameterization="eps", variance="learned")


def test_fixed_variances_and_backward_compatible_learned_default():
  schedule = diffusion.respace(FULL, 10)
  posterior = np.asarray(schedule.posterior_variance)
  betas = np.asarray(schedule.betas)
  np.testing.assert_allclose(
    diffusion.fixed_variances(schedule, "large"), np.append(posterior[1], betas[1:])
  )
  np.testing.assert_allclose(
    diffusion.fixed_variances(schedule, "small")[1:], posterior[1:], rtol=1e-5
  )
  learned = _oracle(learned=True)
  common = dict(shape=(8, D), rng=jax.random.PRNGKey(3), parameterization="eps")
  # learned_variance=True alone still means the learned variance.
  default = diffusion.ddpm_sample(learned, schedule, learned_variance=True, **common)
  explicit = diffusion.ddpm_sample(
    learned, schedule, learned_variance=True, variance="learned", **common
  )
  np.testing.assert_array_equal(default, explicit)
  # A learned-variance model can still sample with a fixed variance: same as the plain model.
  fixed = diffusion.ddpm_sample(
    learned, schedule, learned_variance=True, variance="large", **common
  )
  plain = diffusion.ddpm_sample(_oracle(), schedule, variance="large", **common)
  np.testing.assert_allclose(fixed, plain, atol=1e-6)


def test_new_functions_compile_to_one_loop():
  calls = []

  def model_fn(x_t, t):
    calls.append(x_t.shape)
    return _oracle()(x_t, t)

  schedule = diffusion.respace(FULL, 10)
  x0 = jnp.zeros((4, D))
  gamma = jnp.full((10,), 0.5)
  jaxpr = str(jax.make_jaxpr(
    lambda rng: diffusion.estimate_eps_moments(model_fn, schedule, x0, rng, parameterization="eps")
  )(jax.random.PRNGKey(0)))
  assert "scan" in jaxpr or "while" in jaxpr
  jaxpr = str(jax.make_jaxpr(
    lambda rng: diffusion.analytic_sample(
      model_fn, schedule, eps_moments=gamma, shape=(4, D), rng=rng, parameterization="eps"
    )
  )(jax.random.PRNGKey(0)))
  assert "scan" in jaxpr
  assert len(calls) == 2  # traced once each, not once per step
