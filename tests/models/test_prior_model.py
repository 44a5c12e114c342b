"""Diffusion prior: named params, paper size, sharding, scan, masks, CFG."""
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec

from unclip_jax.models.prior import PriorTransformer
from unclip_jax.models.transformer import unscan_params
from unclip_jax.parallel.axes import DEFAULT_RULES
from unclip_jax.parallel.mesh import make_mesh
from unclip_jax.parallel.partitioning import logical_shardings

TINY = dict(embed_dim=8, text_width=12, width=16, depth=2, num_heads=2,
            context_length=6)
BATCH, LENGTH = 4, TINY["context_length"]
PAPER = dict(embed_dim=1024, text_width=1024, width=2048, depth=24,
             num_heads=32, context_length=77, mlp_ratio=4.0)


def _key(seed):
  # unsafe_rbg: init compiles in a fraction of threefry's time on CPU.
  return jax.random.key(seed, impl="unsafe_rbg")


def _inputs(seed=0):
  """(noised z_i, timesteps, z_t, text encodings, text mask, drop_text)."""
  rng = np.random.default_rng(seed)  # numpy: no RNG kernels to compile
  normal = lambda *shape: jnp.asarray(rng.normal(size=shape), jnp.float32)
  lengths = jnp.array([6, 4, 1, 3])
  return (normal(BATCH, TINY["embed_dim"]),
          jnp.array([0, 10, 500, 999], jnp.int32),
          normal(BATCH, TINY["embed_dim"]),
          normal(BATCH, LENGTH, TINY["text_width"]),
          jnp.arange(LENGTH)[None] < lengths[:, None],
          jnp.zeros((BATCH,), bool))


@pytest.fixture(scope="module")
def sharded():
  """Params initialised directly sharded on a (2, 2, 2) mesh, and the
  forward pass run sharded, with the default logical axis rules."""
  model = PriorTransformer(**TINY)
  inputs = _inputs()
  mesh = make_mesh((2, 2, 2))
  abstract = jax.eval_shape(model.init, _key(1), *inputs)
  with jax.set_mesh(mesh), nn.logical_axis_rules(DEFAULT_RULES):
    shardings = logical_shardings(abstract, mesh, DEFAULT_RULES)
    params = jax.jit(model.init, out_shardings=shardings)(_key(1), *inputs)
    output = jax.jit(model.apply)(params, *inputs)
  return params, output


@pytest.fixture(scope="module")
def model_and_params(sharded):
  """The same params gathered onto one device."""
  local = jax.device_put(jax.device_get(sharded[0]), jax.devices()[0])
  return PriorTransformer(**TINY), local


@pytest.fixture(scope="module")
def apply_fn(model_and_params):
  return jax.jit(model_and_params[0].apply)


@pytest.fixture(scope="module")
def states_fn(model_and_params):
  model = model_and_params[0]
  return jax.jit(lambda p, *a: model.apply(
      p, *a, method=PriorTransformer.hidden_states))


def _every_row_differs(a, b):
  diff = np.abs(np.asarray(a) - np.asarray(b))
  return bool((diff.reshape(len(diff), -1).max(axis=1) > 1e-5).all())


def _count(tree):
  return sum(math.prod(x.shape) for x in jax.tree.leaves(nn.unbox(tree)))


def _expected_prior_params(c):
  w, d, e, t = c["width"], c["embed_dim"], c["embed_dim"], c["text_width"]
  hidden = int(w * c["mlp_ratio"])
  block = 4 * (w * w + w) + (w * hidden + hidden + hidden * w + w) + 4 * w
  return (c["depth"] * block
          + (t * w + w) + 2 * (e * w + w)  # text encodings, z_t, z_i in
          + 2 * (w * w + w)  # timestep MLP
          + w  # query
          + (c["context_length"] + 4) * w  # positions
          + c["context_length"] * t + e  # null caption
          + 2 * w  # ln_final
          + w * d + d)  # out


def test_every_param_has_logical_names():
  abstract = jax.eval_shape(PriorTransformer(**TINY).init, _key(0),
                            *_inputs())
  is_box = lambda x: isinstance(x, nn.LogicallyPartitioned)
  leaves = jax.tree.leaves(abstract, is_leaf=is_box)
  assert leaves and all(is_box(leaf) for leaf in leaves)
  assert all(len(leaf.names) == leaf.value.ndim for leaf in leaves)


def test_paper_prior_parameter_count():
  c = PAPER
  shapes = (jax.ShapeDtypeStruct((1, c["embed_dim"]), jnp.float32),
            jax.ShapeDtypeStruct((1,), jnp.int32),
            jax.ShapeDtypeStruct((1, c["embed_dim"]), jnp.float32),
            jax.ShapeDtypeStruct((1, c["context_length"], c["text_width"]),
                                 jnp.float32),
            jax.ShapeDtypeStruct((1, c["context_length"]), jnp.bool_),
            jax.ShapeDtypeStruct((1,), jnp.bool_))
  abstract = jax.eval_shape(PriorTransformer(**c).init, _key(0), *shapes)
  total = _count(abstract)
  assert total == _expected_prior_params(c)
  assert 0.9e9 <= total <= 1.4e9
  print(f"paper prior params: {total:,}")


def test_output_shape(model_and_params, apply_fn):
  _, params = model_and_params
  out = apply_fn(params, *_inputs())
  assert out.shape == (BATCH, TINY["embed_dim"]) and out.dtype == jnp.float32
  assert np.isfinite(out).all()


def test_causal_mask(model_and_params, states_fn):
  _, params = model_and_params
  noised, timesteps, z_text, encodings, mask, drop = _inputs()
  base = states_fn(params, noised, timesteps, z_text, encodings, mask, drop)
  assert base.shape == (BATCH, LENGTH + 4, TINY["width"])
  # Perturbing the noised z_i (token L + 2) leaves tokens <= L + 1 unchanged.
  out = states_fn(params, noised + 1.0, timesteps, z_text, encodings, mask,
                  drop)
  np.testing.assert_array_equal(out[:, :LENGTH + 2], base[:, :LENGTH + 2])
  assert _every_row_differs(out[:, LENGTH + 2], base[:, LENGTH + 2])
  assert _every_row_differs(out[:, LENGTH + 3], base[:, LENGTH + 3])
  # Perturbing the timestep (token L + 1) leaves tokens <= L unchanged.
  out = states_fn(params, noised, timesteps + 7, z_text, encodings, mask, drop)
  np.testing.assert_array_equal(out[:, :LENGTH + 1], base[:, :LENGTH + 1])
  assert _every_row_differs(out[:, LENGTH + 1], base[:, LENGTH + 1])
  assert _every_row_differs(out[:, LENGTH + 3], base[:, LENGTH + 3])
  # Perturbing z_t (token L) changes z_t's own state and the rest.
  out = states_fn(params, noised, timesteps, z_text + 1.0, encodings, mask,
                  drop)
  np.testing.assert_array_equal(out[:, :LENGTH], base[:, :LENGTH])
  assert _every_row_differs(out[:, LENGTH], base[:, LENGTH])


def test_padded_text_is_ignored(model_and_params, apply_fn, states_fn):
  _, params = model_and_params
  noised, timesteps, z_text, encodings, mask, drop = _inputs()
  garbage = 10.0 * jax.random.normal(jax.random.key(9), encodings.shape)
  padded_changed = jnp.where(mask[..., None], encodings, garbage)
  args = (noised, timesteps, z_text)
  np.testing.assert_allclose(
      apply_fn(params, *args, padded_changed, mask, drop),
      apply_fn(params, *args, encodings, mask, drop), atol=1e-6)
  # Real tokens and the four extra tokens never see padded text.
  states = states_fn(params, *args, padded_changed, mask, drop)
  base = states_fn(params, *args, encodings, mask, drop)
  real = np.concatenate([mask, np.ones((BATCH, 4), bool)], axis=1)
  np.testing.assert_allclose(states[real], base[real], atol=1e-6)
  # ... while the real text matters.
  real_changed = jnp.where(mask[..., None], garbage, encodings)
  assert _every_row_differs(apply_fn(params, *args, real_changed, mask, drop),
                            apply_fn(params, *args, encodings, mask, drop))


def test_drop_text_uses_the_null_caption(model_and_params, apply_fn):
  _, params = model_and_params
  noised, timesteps, z_text, encodings, mask, _ = _inputs(0)
  _, _, other_z_text, other_encodings, _, _ = _inputs(1)
  drop = jnp.array([True, False, True, False])
  other_mask = jnp.ones_like(mask).at[:, 3:].set(False)
  out = apply_fn(params, noised, timesteps, z_text, encodings, mask, drop)
  other = apply_fn(params, noised, timesteps, other_z_text, other_encodings,
                   other_mask, drop)
  np.testing.assert_allclose(out[drop], other[drop], atol=1e-6)
  assert _every_row_differs(out[~drop], other[~drop])
  # Equal to feeding the null embeddings as the caption, all valid.
  p = nn.unbox(params)["params"]
  null = apply_fn(
      params, noised, timesteps,
      jnp.broadcast_to(p["null_text_embedding"], z_text.shape),
      jnp.broadcast_to(p["null_text_encodings"], encodings.shape),
      jnp.ones_like(mask), jnp.zeros_like(drop))
  np.testing.assert_allclose(out[drop], null[drop], atol=1e-6)


def test_sharded_matches_unsharded(sharded, apply_fn):
  params, output = sharded
  fc_in = params["params"]["transformer"]["blocks"]["mlp"]["fc_in"]["kernel"]
  assert fc_in.names == ("layers", "embed", "mlp")
  assert fc_in.value.sharding.spec == PartitionSpec(None, "fsdp", "tensor")
  assert len(fc_in.value.sharding.device_set) == 8
  local = jax.device_put(jax.device_get(nn.unbox(params)), jax.devices()[0])
  np.testing.assert_allclose(output, apply_fn(local, *_inputs()), atol=1e-5)


def test_scan_and_loop_agree(model_and_params, apply_fn):
  _, params = model_and_params
  looped = jax.jit(PriorTransformer(**TINY, scan_layers=False).apply)(
      unscan_params(nn.unbox(params)), *_inputs())
  np.testing.assert_allclose(looped, apply_fn(params, *_inputs()), atol=1e-5)


def test_bfloat16_close_to_float32(model_and_params, apply_fn):
  _, params = model_and_params
  low = jax.jit(PriorTransformer(**TINY, dtype=jnp.bfloat16).apply)(
      params, *_inputs())
  high = apply_fn(params, *_inputs())
  assert low.dtype == jnp.float32
  assert np.linalg.norm(low - high) / np.linalg.norm(high) < 0.05
