"""Parts of the prior stage that need no trained CLIP: drop rate, best-of-N, scaling,
the sampler as one compiled call, and the paper preset's size."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import clip as clip_config
from configs import prior as prior_config
from unclip_jax.errors import ConfigError
from unclip_jax.generators.base import ClipSizes
from unclip_jax.generators.prior import (Prior, make_scaler, select_best_candidate,
                                         text_drop_mask)
from unclip_jax.stages.prior import sample_metrics


def test_text_drop_mask_rate():
  drop = np.asarray(text_drop_mask(jax.random.key(0), 100_000, 0.1))
  assert drop.dtype == bool
  assert abs(drop.mean() - 0.1) < 0.005
  assert not np.asarray(text_drop_mask(jax.random.key(0), 1000, 0.0)).any()


def test_best_of_n_keeps_highest_dot_product():
  text = np.array([[1.0, 0.0], [0.0, 1.0]])
  # [candidates=3, batch=2, dim=2]; the norm must not matter, only the direction.
  candidates = np.array([
      [[0.6, 0.8], [5.0, 0.1]],
      [[10.0, 1.0], [0.1, 0.2]],
      [[0.0, 1.0], [-1.0, -1.0]],
  ])
  best = np.asarray(select_best_candidate(jnp.asarray(candidates), jnp.asarray(text)))
  np.testing.assert_allclose(best, [[10.0, 1.0], [0.1, 0.2]])


@pytest.mark.parametrize("scale", ["standardize", "sqrt_dim", "17.2"])
def test_scaler_round_trip(scale):
  rng = np.random.default_rng(0)
  stats = (rng.normal(size=8) * 0.1, rng.uniform(0.1, 0.3, 8))
  scaler = make_scaler(scale, 8, stats)
  z = rng.normal(size=(4, 8)).astype(np.float32)
  np.testing.assert_allclose(scaler.from_model(scaler.to_model(z)), z, atol=1e-5)
  if scale == "sqrt_dim":
    np.testing.assert_allclose(scaler.to_model(z), z * np.sqrt(8), rtol=1e-6)


def test_bad_embedding_scale():
  with pytest.raises(ConfigError, match="embedding_scale"):
    make_scaler("unit", 8)


def test_sample_metrics():
  true = np.eye(4)
  perfect = sample_metrics(true * 3.0, true)
  assert perfect == {"eval/prior_cos": 1.0, "eval/prior_cos_shuffled": 0.0,
                     "eval/prior_top1": 1.0}


def test_sample_is_one_compiled_call():
  config = prior_config.get_config("tiny")
  config.model.text_context = 4  # reads the first 4 of CLIP's 6 token encodings
  prior = Prior.from_config(config, ClipSizes(
      embed_dim=8, text_width=12, context_length=6, vocab_size=64, resolution=16,
      image_embedding_mean=(0.0,) * 8, image_embedding_std=(0.3,) * 8))
  assert prior.model.context_length == 4
  params = jax.jit(lambda r: nn.unbox(prior.init_params(r)))(jax.random.key(0))
  rng = np.random.default_rng(0)
  text_embedding = rng.normal(size=(3, 8)).astype(np.float32)
  encodings = rng.normal(size=(3, 6, 12)).astype(np.float32)
  mask = np.arange(6)[None] < np.array([[2], [6], [1]])
  kwargs = dict(num_steps=5, guidance_scale=3.0, num_candidates=2)
  conditioning = {"text_embedding": text_embedding, "text_encodings": encodings,
                  "text_mask": mask}
  first = prior.sample(params, conditioning, jax.random.key(1), **kwargs)
  again = prior.sample(params, conditioning, jax.random.key(1), **kwargs)
  other = prior.sample(params, conditioning, jax.random.key(2), **kwargs)
  assert first.shape == (3, 8) and np.isfinite(np.asarray(first)).all()
  np.testing.assert_array_equal(first, again)
  assert not np.allclose(first, other)
  # pylint: disable=protected-access
  assert prior._sampler._cache_size() == 1  # every step, candidate, guidance inside
  # The 5 DDIM steps are one loop in the program, not 5 unrolled model calls.
  lowered = prior._sampler.lower(params, text_embedding, encodings, mask,
                                 jax.random.key(1), drop_text=None, x_T=None,
                                 eta=0.0, **kwargs).as_text()
  assert "while" in lowered


def test_paper_preset_is_about_one_billion_parameters():
  config = prior_config.get_config("paper")
  clip = clip_config.get_config("paper")
  prior = Prior.from_config(config, ClipSizes.from_config(clip))
  abstract = jax.eval_shape(prior.init_params, jax.random.key(0))
  count = sum(x.size for x in jax.tree.leaves(nn.unbox(abstract)))
  assert 0.9e9 < count < 1.4e9, count
  assert (config.model.width, config.model.depth, config.model.num_heads) == (
      2048, 24, 32)
  assert config.diffusion.num_timesteps == 1000 and config.sample.num_steps == 64
  assert (config.optim.lr, config.optim.b2, config.optim.eps,
          config.optim.weight_decay, config.optim.ema_decay) == (
              1.1e-4, 0.96, 1e-6, 6e-2, 0.9999)
  assert config.batch_size == 4096 and config.total_steps == 600_000
  assert config.dtype == "bfloat16"
