"""The prior's sampler encodes the caption prefix once per call (models/prior.py
`encode_prefix`) and runs only the tokens after it per step: its samples equal
those of the sampler that runs the whole sequence every step, for every
sampler, with and without guidance, padded captions and dropped captions, on
scanned and looped stacks."""
import functools

import flax.linen as nn
import jax
import numpy as np
import pytest

from configs import clip as clip_config
from configs import prior as prior_config
from unclip_jax import diffusion
from unclip_jax.generators import common
from unclip_jax.generators.base import ClipSizes, EpsMoments
from unclip_jax.generators.prior import (DROP_TEXT, Prior,
                                         select_best_candidate)
from unclip_jax.models.transformer import unscan_params

CAPTIONS, CANDIDATES, STEPS = 4, 2, 4


def _prior(scan_layers: bool) -> Prior:
  config = prior_config.get_config("tiny")
  clip_sizes = ClipSizes.from_config(clip_config.get_config("tiny"))
  # A text context shorter than the CLIP's: the sampler reads the first tokens.
  config.model.update(width=16, depth=2, scan_layers=scan_layers,
                      text_context=clip_sizes.context_length - 2)
  return Prior.from_config(config, clip_sizes)


@functools.cache
def _whole_sequence_sampler(prior: Prior):
  """The sampler before the cache: the whole sequence through the model at
  every step, the caption dropped where guidance or drop_text says."""
  def sample(params, text_embedding, text_encodings, text_mask, drop_text, rng,
             eps_moments, *, guidance_scale, sampler, eta, variance):
    rows = CANDIDATES * text_embedding.shape[0]
    conditional = prior._conditional_model(  # pylint: disable=protected-access
        params, *diffusion.match_batch(
            (text_embedding, text_encodings, text_mask), rows))
    model_fn = diffusion.guided(
        lambda x_t, t, drop: conditional(
            x_t, t, drop | diffusion.match_batch(drop_text, x_t.shape[0])),
        guidance_scale)
    x = diffusion.sample(
        sampler, model_fn, diffusion.respace(prior.schedule, STEPS),
        shape=(rows, prior.model.embed_dim), rng=rng,
        parameterization=prior.parameterization, eta=eta, variance=variance,
        eps_moments=eps_moments, x0_variance_bound=prior.x0_variance_bound)
    candidates = prior.scaler.from_model(x).reshape(CANDIDATES, -1,
                                                    prior.model.embed_dim)
    return select_best_candidate(candidates, text_embedding)
  return jax.jit(sample, static_argnames=("guidance_scale", "sampler", "eta",
                                          "variance"))


@pytest.fixture(scope="module")
def priors_and_params():
  """{scan_layers: (prior, params)}: numpy-drawn params (no init to compile),
  the looped prior's unstacked from the scanned prior's."""
  scanned = _prior(scan_layers=True)
  abstract = nn.unbox(jax.eval_shape(scanned.init_params, jax.random.key(0)))
  draw = np.random.default_rng(0)
  params = jax.tree.map(
      lambda a: draw.normal(0, 0.3, a.shape).astype(a.dtype), abstract)
  return {True: (scanned, params),
          False: (_prior(scan_layers=False), unscan_params(params))}


def _conditioning(prior: Prior) -> dict:
  """Captions of 3, 1, full and 2 real tokens (of the CLIP's context, longer
  than the model's), the third sampled without its caption."""
  draw = np.random.default_rng(1)
  context, dim = prior.clip_context, prior.model.embed_dim
  lengths = np.array([3, 1, context, 2])
  return {"text_embedding": draw.normal(size=(CAPTIONS, dim)).astype(np.float32),
          "text_encodings": draw.normal(size=(
              CAPTIONS, context, prior.model.text_width)).astype(np.float16),
          "text_mask": np.arange(context)[None] < lengths[:, None],
          DROP_TEXT: np.array([False, False, True, False])}


@pytest.mark.parametrize("sampler,guidance_scale,scan_layers", [
    ("ddim", 1.0, True), ("ddim", 3.0, False), ("ddpm", 3.0, True),
    ("analytic", 2.0, False)])
def test_cached_sampler_equals_the_whole_sequence_sampler(
    priors_and_params, sampler, guidance_scale, scan_layers):
  prior, params = priors_and_params[scan_layers]
  conditioning = _conditioning(prior)
  # Made up, but plausible: Gamma falls from 1 towards 0 as the noise does.
  moments = EpsMoments((0, 999), (0.2, 1.0))
  eta = 0.5 if sampler == "ddim" else None  # eta > 0: noise drawn every step
  rng = jax.random.key(2)
  cached = prior.sample(params, conditioning, rng, num_steps=STEPS,
                        guidance_scale=guidance_scale,
                        num_candidates=CANDIDATES, sampler=sampler, eta=eta,
                        eps_moments=moments)
  gamma, chosen = common.resolve_sampling(
      prior, num_steps=STEPS, sampler=sampler, variance=None, eta=eta,
      eps_moments=moments)
  context = prior.model.context_length
  whole = _whole_sequence_sampler(prior)(
      params, conditioning["text_embedding"],
      conditioning["text_encodings"][:, :context],
      conditioning["text_mask"][:, :context], conditioning[DROP_TEXT], rng,
      gamma, guidance_scale=guidance_scale, sampler=chosen["sampler"],
      eta=chosen["eta"], variance=chosen["variance"])
  np.testing.assert_allclose(cached, whole, rtol=1e-5, atol=1e-5)
  assert np.isfinite(np.asarray(cached)).all()
  # Guidance and the dropped caption matter: the rows are not all alike.
  assert np.ptp(np.asarray(cached), axis=0).max() > 1e-2
