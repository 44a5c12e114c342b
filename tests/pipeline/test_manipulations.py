"""Variations, DDIM inversion, interpolations and text diffs on the tiny chain's
training images."""
import numpy as np
import pytest

from unclip_jax.errors import UserError
from unclip_jax.pipeline import slerp
from unclip_jax.data.images import resize_image

# Inversion is exact only to the ODE's discretisation: the tiny decoder's 2
# sampling steps jump from x_0 to pure noise at once. Every inversion here uses
# the same steps, so that each program compiles once.
STEPS = dict(decoder_steps=10)


def _mean_error(images, truth) -> float:
  """Mean absolute difference of uint8 images, in 0-255 levels."""
  return float(np.abs(np.asarray(images, float) - np.asarray(truth, float)).mean())


def test_slerp_endpoints_norm_and_constant_speed():
  rng = np.random.default_rng(0)
  a, b = (x / np.linalg.norm(x) for x in rng.normal(size=(2, 16)))
  path = slerp(a, b, np.linspace(0, 1, 5))
  np.testing.assert_allclose(path[0], a, atol=1e-6)
  np.testing.assert_allclose(path[-1], b, atol=1e-6)
  np.testing.assert_allclose(np.linalg.norm(path, axis=1), 1, atol=1e-6)
  angles = np.arccos(np.clip(np.sum(path[1:] * path[:-1], axis=1), -1, 1))
  np.testing.assert_allclose(angles, angles[0], atol=1e-5)
  np.testing.assert_allclose(slerp(a, a, [0.3])[0], a, atol=1e-6)  # no angle


@pytest.fixture(scope="module")
def image(training_records):
  return training_records[0]["image"]  # uint8 [16, 16, 3], the CLIP's side


@pytest.fixture(scope="module")
def inverted(pipe, image):
  return pipe.invert(image, **STEPS)


def test_inversion_reconstructs_a_training_image(pipe, image, inverted):
  assert inverted.shape == (8, 8, 3) and np.isfinite(inverted).all()
  truth = resize_image(image, pipe.base_resolution)
  z_i = pipe.encode_images(image)
  reconstruction = pipe.decode(z_i, noise=inverted, decoder_eta=0.0, **STEPS)
  error = _mean_error(reconstruction.base_images[0], truth)
  other = pipe.decode(z_i, noise=pipe.noise(0, 1), decoder_eta=0.0, **STEPS)
  assert error < 6, error  # measured 2.7 levels
  assert _mean_error(other.base_images[0], truth) > 5 * error
  assert reconstruction.images.shape == (1, 16, 16, 3)  # through the upsampler


def test_variations_share_the_image_embedding(pipe, image):
  out = pipe.variations(image, num_images=3, seed=0)
  assert out.images.shape == (3, 16, 16, 3)
  z_i = pipe.encode_images(image)
  np.testing.assert_allclose(out.image_embeddings, np.repeat(z_i, 3, 0), atol=1e-6)
  assert len({x.tobytes() for x in out.base_images}) == 3
  again = pipe.variations(image, num_images=3, seed=0)
  np.testing.assert_array_equal(again.images, out.images)


def test_interpolation_endpoints_are_the_inputs_embeddings(pipe, training_records):
  a, b = training_records[0]["image"], training_records[1]["image"]
  out = pipe.interpolate(a, b, num_steps=5, seed=0)
  assert out.images.shape == (5, 16, 16, 3)
  ends = pipe.encode_images([a, b])
  np.testing.assert_allclose(out.image_embeddings[0], ends[0], atol=1e-5)
  np.testing.assert_allclose(out.image_embeddings[-1], ends[1], atol=1e-5)
  np.testing.assert_allclose(np.linalg.norm(out.image_embeddings, axis=1), 1,
                             atol=1e-5)
  np.testing.assert_allclose(out.fractions, np.linspace(0, 1, 5), atol=1e-6)
  for frame in out.noise[1:]:  # "fixed": one x_T for every frame
    np.testing.assert_array_equal(frame, out.noise[0])


def test_interpolation_between_inverted_latents_reconstructs_the_ends(
    pipe, training_records, inverted):
  a, b = training_records[0]["image"], training_records[1]["image"]
  out = pipe.interpolate(a, b, num_steps=3, latents="inverted", **STEPS)
  np.testing.assert_allclose(out.noise[0], inverted, atol=1e-5)
  side = pipe.base_resolution
  assert _mean_error(out.base_images[0], resize_image(a, side)) < 6
  assert _mean_error(out.base_images[-1], resize_image(b, side)) < 6


def test_text_diff_moves_toward_the_difference(pipe, image, inverted):
  out = pipe.text_diff(image, "a red background", "a blue background",
                       num_steps=4, max_theta=0.5, **STEPS)
  assert out.images.shape == (4, 16, 16, 3)
  np.testing.assert_allclose(out.fractions, np.linspace(0, 0.5, 4), atol=1e-6)
  z_i = pipe.encode_images(image)[0]
  np.testing.assert_allclose(out.image_embeddings[0], z_i, atol=1e-5)
  z_from, z_to = pipe.encode_text(["a red background", "a blue background"])
  direction = (z_to - z_from) / np.linalg.norm(z_to - z_from)
  toward = out.image_embeddings @ direction
  assert np.all(np.diff(toward) > 0)
  for frame in out.noise:  # every frame from the image's inverted x_T
    np.testing.assert_allclose(frame, inverted, atol=1e-5)
  truth = resize_image(image, pipe.base_resolution)
  assert _mean_error(out.base_images[0], truth) < 6  # frame 0: the image back


@pytest.mark.parametrize("call, message", [
    (lambda p, x: p.variations(x, num_images=0), "num_images must be"),
    (lambda p, x: p.variations([x, x]), "variations takes one image"),
    (lambda p, x: p.interpolate(x, x, latents="warped"), "latents='warped'"),
    (lambda p, x: p.interpolate(x, x, num_steps=0), "num_steps must be"),
    (lambda p, x: p.text_diff(x, "a", "b", max_theta=2), "max_theta=2"),
    (lambda p, x: p.text_diff(x, "a cat", "a cat"), "same CLIP text embedding"),
    (lambda p, x: p.invert(x.astype(np.float32)), "uint8"),
    (lambda p, x: p.invert("/no/such/image.png"), "no image at"),
    (lambda p, x: p.decode(np.zeros((2, 5))), "image_embeddings must be"),
    (lambda p, x: p.decode(np.zeros((1, 32)), captions=["a", "b"]),
     "2 captions for 1 images"),
])
def test_bad_manipulation_inputs_are_one_line_errors(pipe, image, call, message):
  with pytest.raises(UserError, match=message) as raised:
    call(pipe, image)
  assert "\n" not in str(raised.value)
