"""The decoder's sampler encodes the condition once per call (caption encoder,
z_i projections) instead of at every step: the same images as the per-step
model, guided or not, and through the DDIM inversion too."""
import flax.linen as nn
import jax
import numpy as np
import pytest

from configs import clip as clip_config
from configs import decoder as decoder_config
from unclip_jax.generators import common
from unclip_jax.generators.base import IMAGE_EMBEDDING, TOKENS, ClipSizes
from unclip_jax.generators.decoder import Decoder


@pytest.fixture(scope="module")
def decoder_and_params():
  config = decoder_config.get_config("tiny")
  config.model.learned_variance = True  # the variance half passes through too
  decoder = Decoder.from_config(config, ClipSizes.from_config(
      clip_config.get_config("tiny")))
  abstract = nn.unbox(jax.eval_shape(decoder.init_params, jax.random.key(0)))
  draw = np.random.default_rng(0)
  params = jax.tree.map(lambda a: draw.normal(0, 0.2, a.shape).astype(a.dtype),
                        abstract)
  return decoder, params


def _conditioning(decoder, rows=4):
  draw = np.random.default_rng(1)
  tokens = draw.integers(3, 200, (rows, decoder.clip_context)).astype(np.int32)
  tokens[:, 5:] = 0
  return {IMAGE_EMBEDDING: draw.normal(size=(rows, decoder.image_embedding_dim)
                                       ).astype(np.float32), TOKENS: tokens}


@pytest.mark.parametrize("guidance_scale", [1.0, 3.0])
def test_encoding_once_gives_the_per_step_samples(decoder_and_params,
                                                  guidance_scale):
  decoder, params = decoder_and_params
  conditioning = _conditioning(decoder)
  per_step = common.make_sampler(
      decoder.apply, decoder.schedule, parameterization=decoder.parameterization,
      learned_variance=decoder.learned_variance)
  condition = decoder._condition(conditioning)  # pylint: disable=protected-access
  side = decoder.resolution
  expected = per_step(params, condition, jax.random.key(2),
                      shape=(4, side, side, 3), num_steps=3,
                      guidance_scale=guidance_scale, clip_denoised=False)
  got = decoder.sample(params, conditioning, jax.random.key(2), num_steps=3,
                       guidance_scale=guidance_scale, clip_denoised=False)
  np.testing.assert_allclose(got, expected, atol=2e-5)


def test_inversion_encodes_once_too(decoder_and_params):
  decoder, params = decoder_and_params
  conditioning = _conditioning(decoder)
  side = decoder.resolution
  images = np.random.default_rng(3).uniform(-1, 1, (4, side, side, 3)).astype(
      np.float32)
  per_step = common.make_ddim_inverter(
      decoder.apply, decoder.schedule, parameterization=decoder.parameterization,
      learned_variance=decoder.learned_variance)
  condition = decoder._condition(conditioning)  # pylint: disable=protected-access
  expected = per_step(params, condition, images, num_steps=3, guidance_scale=2.0)
  got = decoder.invert(params, conditioning, images, num_steps=3,
                       guidance_scale=2.0)
  np.testing.assert_allclose(got, expected, atol=2e-5)
