"""The prior's caption cache: the caption prefix encoded once, then the tokens
after it run alone against its keys and values, give what one pass over the
whole sequence gives (scanned and looped stacks, remat, padding, dropped
captions, sharded)."""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from unclip_jax.models import transformer
from unclip_jax.models.prior import PriorTransformer
from unclip_jax.models.transformer import TransformerStack
from unclip_jax.parallel.axes import DEFAULT_RULES
from unclip_jax.parallel.mesh import make_mesh

from tests.models.test_prior_model import BATCH, LENGTH, TINY
from tests.models.test_prior_model import _inputs as _undropped_inputs


def _inputs():
  """(noised z_i, timesteps, z_t, text encodings, text mask, drop_text):
  captions of 6, 4, 1 and 3 real tokens, the second one dropped."""
  *inputs, _ = _undropped_inputs()
  return (*inputs, jnp.arange(BATCH) == 1)


@pytest.fixture(scope="module")
def scanned_params():
  # unsafe_rbg: init compiles in a fraction of threefry's time on CPU.
  return nn.unbox(jax.jit(PriorTransformer(**TINY).init)(
      jax.random.key(1, impl="unsafe_rbg"), *_inputs())["params"])


@functools.cache
def _full_and_cached(scan_layers: bool):
  """A jitted fn(params, *inputs) -> (`__call__` on the whole sequence,
  `predict_from_prefix` on the cached caption, both [batch, embed_dim]; the
  cache), compiled once per module for each stack."""
  model = PriorTransformer(**TINY, scan_layers=scan_layers)

  def run(params, noised, timesteps, *caption):
    variables = {"params": params}
    full = model.apply(variables, noised, timesteps, *caption)
    prefix = model.apply(variables, *caption, method=model.encode_prefix)
    cached = model.apply(variables, noised, timesteps, prefix,
                         method=model.predict_from_prefix)
    return full, cached, prefix
  return jax.jit(run)


@pytest.mark.parametrize("scan_layers", [True, False])
def test_cached_prefix_predicts_what_the_full_pass_does(scanned_params,
                                                        scan_layers):
  params = (scanned_params if scan_layers
            else transformer.unscan_params(scanned_params))
  full, cached, prefix = _full_and_cached(scan_layers)(params, *_inputs())
  np.testing.assert_allclose(cached, full, rtol=1e-5, atol=1e-5)
  head_dim = TINY["width"] // TINY["num_heads"]
  cache_shape = (TINY["depth"], BATCH, LENGTH + 1, TINY["num_heads"], head_dim)
  assert prefix.keys.shape == prefix.values.shape == cache_shape
  # The dropped caption is the null one, which has no padding; z_t is real.
  np.testing.assert_array_equal(prefix.key_valid.sum(axis=1), [7, 7, 2, 4])


def test_the_cache_depends_on_the_caption_only(scanned_params):
  noised, timesteps, *caption = _inputs()
  first = _full_and_cached(True)(scanned_params, noised, timesteps, *caption)
  later = _full_and_cached(True)(scanned_params, noised * 2.0,
                                 timesteps[::-1], *caption)
  np.testing.assert_array_equal(first[2].keys, later[2].keys)
  assert not np.allclose(first[1], later[1])


@pytest.mark.parametrize("scan_layers,remat_policy",
                         [(True, "full"), (False, "dots")])
def test_stack_prefix_then_suffix_equals_one_pass(scan_layers, remat_policy):
  """At the suffix positions, under a causal mask with padded prefix keys."""
  depth, prefix_length, width = 3, 5, 16
  stack = TransformerStack(width, depth, 4, causal=True,
                           scan_layers=scan_layers, remat_policy=remat_policy)
  x = jnp.asarray(np.random.default_rng(2).normal(size=(2, 8, width)),
                  jnp.float32)
  valid = jnp.array([[1, 1, 1, 0, 0, 1, 1, 1], [1] * 8], bool)

  def run(x, valid):
    params = stack.init(jax.random.key(0, impl="unsafe_rbg"), x, valid)
    whole = stack.apply(params, x, valid)
    _, cache = stack.apply(params, x[:, :prefix_length],
                           valid[:, :prefix_length], return_key_values=True)
    suffix = stack.apply(params, x[:, prefix_length:], valid,
                         prefix_key_values=cache)
    return whole, suffix, cache

  whole, suffix, cache = jax.jit(run)(x, valid)
  np.testing.assert_allclose(suffix, whole[:, prefix_length:], rtol=1e-5,
                             atol=1e-5)
  assert cache[0].shape == (depth, 2, prefix_length, 4, width // 4)


def test_suffix_mask_is_the_last_rows_of_the_full_mask():
  valid = np.array([[1, 1, 0, 1, 1, 1], [1, 0, 0, 0, 1, 1]], bool)
  full, last_two = jax.jit(lambda v: (
      transformer.make_attention_mask(v, causal=True),
      transformer.make_attention_mask(v, causal=True, num_queries=2)))(valid)
  np.testing.assert_array_equal(last_two, full[:, :, -2:])


def test_cache_runs_sharded_with_the_default_rules(scanned_params):
  """The sampler's path on a (2, 2, 2) mesh: batch over data x fsdp, heads
  over tensor, params sharded as in training."""
  inputs = _inputs()
  expected = _full_and_cached(True)(scanned_params, *inputs)[0]
  mesh = make_mesh((2, 2, 2))
  with jax.set_mesh(mesh), nn.logical_axis_rules(DEFAULT_RULES):
    _, cached, prefix = _full_and_cached(True)(scanned_params, *inputs)
  np.testing.assert_allclose(cached, expected, rtol=1e-5, atol=1e-5)
  assert len(prefix.keys.sharding.device_set) == 8
