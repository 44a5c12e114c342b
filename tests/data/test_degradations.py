"""Upsampler degradations: deterministic per rng, shapes, range, constant images."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from unclip_jax.data import degradations

SIDE, SCALE = 32, 4


def _images(seed=0, batch=3):
  # Smooth random images (a blurred uniform field), as a photo would be.
  rng = np.random.default_rng(seed)
  images = jnp.asarray(rng.uniform(-1, 1, (batch, SIDE, SIDE, 3)), jnp.float32)
  return jnp.clip(degradations.gaussian_blur(images, 5, 1.0) * 2, -1, 1)


def test_bsr_is_deterministic_per_rng():
  images = _images()
  first = degradations.bsr_degrade(jax.random.key(0), images, SCALE)
  again = degradations.degrade(jax.random.key(0), images, "bsr", SCALE)
  other = degradations.bsr_degrade(jax.random.key(1), images, SCALE)
  assert first.shape == (3, SIDE // SCALE, SIDE // SCALE, 3)
  assert first.dtype == jnp.float32
  np.testing.assert_array_equal(first, again)
  assert np.abs(np.asarray(first) - np.asarray(other)).max() > 1e-3
  assert np.abs(first).max() <= 1 and np.isfinite(first).all()
  # Each image draws its own degradation: same image twice, different result.
  twins = jnp.stack([images[0], images[0], images[1]])
  a, b, _ = degradations.bsr_degrade(jax.random.key(2), twins, SCALE)
  assert np.abs(np.asarray(a) - np.asarray(b)).max() > 1e-3
  # Still the same picture, degraded: close to a clean downsample.
  clean = degradations.degrade(None, images, "blur", SCALE)
  assert np.abs(np.asarray(first) - np.asarray(clean)).mean() < 0.25


def test_blur_of_a_constant_image_is_that_constant():
  constant = jnp.full((2, 16, 16, 3), 0.3)
  np.testing.assert_allclose(degradations.gaussian_blur(constant), 0.3, atol=1e-6)
  np.testing.assert_allclose(
      degradations.gaussian_blur(constant, 7, jnp.array([0.5, 2.0])), 0.3, atol=1e-6)
  low_res = degradations.degrade(jax.random.key(0), constant, "blur", 4)
  assert low_res.shape == (2, 4, 4, 3)
  np.testing.assert_allclose(low_res, 0.3, atol=1e-6)


def test_blur_matches_paper_kernel():
  # Kernel 3, sigma 0.6: an impulse spreads to its 3x3 neighbourhood only.
  impulse = jnp.zeros((1, 9, 9, 1)).at[0, 4, 4, 0].set(1.0)
  blurred = np.asarray(degradations.gaussian_blur(impulse))[0, ..., 0]
  taps = np.exp(-0.5 * (np.array([-1, 0, 1]) / 0.6)**2)
  taps /= taps.sum()
  np.testing.assert_allclose(blurred[3:6, 3:6], np.outer(taps, taps), atol=1e-6)
  assert blurred.sum() == pytest.approx(1.0) and blurred[:3].sum() == 0


def test_degrade_shapes_and_kinds():
  images = _images(batch=2)
  for scale in (2, 4):
    low_res = degradations.degrade(None, images, "blur", scale)
    assert low_res.shape == (2, SIDE // scale, SIDE // scale, 3)
    assert np.abs(low_res).max() <= 1
  with pytest.raises(ValueError, match="blur"):
    degradations.degrade(jax.random.key(0), images, "jpeg", 4)
  with pytest.raises(ValueError, match="divisible"):
    degradations.degrade(None, images[:, :30, :30], "blur", 4)
