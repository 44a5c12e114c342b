"""Schedules against their closed forms; respacing preserves alpha_bar."""
import math

import numpy as np
import pytest

from unclip_jax.diffusion import (
  cosine_betas,
  linear_betas,
  make_schedule,
  respace,
  schedule_from_betas,
)

T = 1000


def _cosine_alpha_bar(u, s=0.008):
  return np.cos((u + s) / (1 + s) * math.pi / 2) ** 2


def test_cosine_schedule_matches_closed_form():
  schedule = make_schedule("cosine", T)
  k = np.arange(T - 1)  # the last beta is clipped at max_beta
  expected = _cosine_alpha_bar((k + 1) / T) / _cosine_alpha_bar(0.0)
  np.testing.assert_allclose(np.asarray(schedule.alphas_cumprod)[:-1], expected, rtol=1e-5)
  expected_betas = 1 - _cosine_alpha_bar((k + 1) / T) / _cosine_alpha_bar(k / T)
  np.testing.assert_allclose(np.asarray(schedule.betas)[:-1], expected_betas, rtol=1e-5)
  assert np.isclose(float(schedule.betas[-1]), 0.999)
  assert cosine_betas(T).dtype == np.float64
  assert np.asarray(schedule.betas).dtype == np.float32


def test_linear_schedule_endpoints_scale_with_T():
  np.testing.assert_allclose(linear_betas(1000)[[0, -1]], [1e-4, 0.02])
  np.testing.assert_allclose(linear_betas(250)[[0, -1]], [4e-4, 0.08])
  schedule = make_schedule("linear", 1000)
  np.testing.assert_allclose(
    np.asarray(schedule.alphas_cumprod), np.cumprod(1 - linear_betas(1000)), rtol=1e-5
  )


def test_unknown_schedule_name_raises():
  with pytest.raises(ValueError, match="Unknown noise schedule 'sigmoid'"):
    make_schedule("sigmoid", 10)


def test_derived_coefficients():
  schedule = make_schedule("cosine", 100)
  betas = cosine_betas(100)
  abar = np.cumprod(1 - betas)
  abar_prev = np.append(1.0, abar[:-1])
  np.testing.assert_allclose(np.asarray(schedule.alphas_cumprod_prev), abar_prev, rtol=1e-6)
  np.testing.assert_allclose(
    np.asarray(schedule.posterior_variance)[1:],
    (betas * (1 - abar_prev) / (1 - abar))[1:],
    rtol=1e-5,
  )
  assert float(schedule.posterior_variance[0]) == 0.0
  log_var = np.asarray(schedule.posterior_log_variance_clipped)
  assert np.all(np.isfinite(log_var))
  assert log_var[0] == log_var[1]
  np.testing.assert_allclose(
    np.asarray(schedule.sqrt_recipm1_alphas_cumprod), np.sqrt(1 / abar - 1), rtol=1e-5
  )
  np.testing.assert_array_equal(np.asarray(schedule.timesteps), np.arange(100))


@pytest.mark.parametrize("name", ["cosine", "linear"])
def test_respace_preserves_alpha_bar_at_kept_steps(name):
  full = make_schedule(name, T)
  spaced = respace(full, 10)
  kept = np.asarray(spaced.timesteps)
  assert kept.dtype == np.int32
  assert kept[0] == 0 and kept[-1] == T - 1
  np.testing.assert_array_equal(kept, np.round(np.linspace(0, T - 1, 10)).astype(int))
  full_alpha_bar = np.asarray(full.alphas_cumprod)
  np.testing.assert_array_equal(np.asarray(spaced.alphas_cumprod), full_alpha_bar[kept])
  # Respacing composes: timesteps still name original indices.
  twice = respace(spaced, 4)
  np.testing.assert_array_equal(np.asarray(twice.timesteps), kept[[0, 3, 6, 9]])
  np.testing.assert_array_equal(
    np.asarray(twice.alphas_cumprod), full_alpha_bar[kept[[0, 3, 6, 9]]]
  )


def test_respace_to_full_length_is_identity_and_bounds_checked():
  full = make_schedule("cosine", 50)
  same = respace(full, 50)
  np.testing.assert_array_equal(np.asarray(same.alphas_cumprod), np.asarray(full.alphas_cumprod))
  # Betas are rebuilt from float32 alpha_bar ratios: close, not bit-equal.
  np.testing.assert_allclose(np.asarray(same.betas), np.asarray(full.betas), rtol=1e-3)
  assert np.asarray(respace(full, 1).timesteps).tolist() == [49]
  with pytest.raises(ValueError):
    respace(full, 51)
  with pytest.raises(ValueError):
    schedule_from_betas(np.zeros(3))


@pytest.mark.parametrize("name", ["cosine", "linear"])
def test_snr_shift_multiplies_the_signal_to_noise_ratio_at_every_step(name):
  def snr(schedule):
    alpha_bar = np.asarray(schedule.alphas_cumprod, np.float64)
    return alpha_bar / (1.0 - alpha_bar)

  plain, shifted = make_schedule(name, T), make_schedule(name, T, snr_shift=0.25)
  # Away from the last steps, where max_beta clips both schedules.
  np.testing.assert_allclose(snr(shifted)[:-2], 0.25 * snr(plain)[:-2], rtol=1e-3)
  assert np.all(np.asarray(shifted.betas) > 0) and np.all(np.asarray(shifted.betas) <= 0.999)
  np.testing.assert_array_equal(np.asarray(make_schedule(name, T, 1.0).betas),
                                np.asarray(plain.betas))
  with pytest.raises(ValueError, match="snr_shift"):
    make_schedule(name, T, snr_shift=0.0)
