"""CLIP towers: named params, paper size, sharding, scan, causality, bf16."""
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec

from unclip_jax.models.clip import CLIP, LOGIT_SCALE_INIT
from unclip_jax.models.text import end_token_index
from unclip_jax.models.transformer import unscan_params
from unclip_jax.parallel.axes import DEFAULT_RULES
from unclip_jax.parallel.mesh import make_mesh
from unclip_jax.parallel.partitioning import logical_shardings

TINY = dict(embed_dim=8, image_size=16, patch_size=8, vision_width=16,
            vision_depth=2, vision_heads=2, text_width=16, text_depth=2,
            text_heads=2, vocab_size=64, context_length=8)
BATCH = 4

PAPER = dict(embed_dim=1024, image_size=256, patch_size=16, vision_width=1280,
             vision_depth=32, vision_heads=16, text_width=1024, text_depth=24,
             text_heads=16, vocab_size=49408, context_length=77, mlp_ratio=4.0)


def _key(seed):
  # unsafe_rbg: init compiles in a fraction of threefry's time on CPU.
  return jax.random.key(seed, impl="unsafe_rbg")


def _inputs():
  rng = np.random.default_rng(0)  # numpy: no RNG kernels to compile
  images = rng.uniform(-1.0, 1.0, (BATCH, 16, 16, 3)).astype(np.float32)
  tokens = rng.integers(1, 64, (BATCH, 8))
  lengths = np.array([8, 5, 3, 1])  # right-padded with pad_id 0
  tokens = np.where(np.arange(8)[None] < lengths[:, None], tokens, 0)
  return jnp.asarray(images), jnp.asarray(tokens, jnp.int32)


@pytest.fixture(scope="module")
def sharded():
  """Params initialised directly sharded on a (2, 2, 2) mesh, and the
  forward pass run sharded, with the default logical axis rules."""
  model = CLIP(**TINY)
  images, tokens = _inputs()
  mesh = make_mesh((2, 2, 2))
  abstract = jax.eval_shape(model.init, _key(2), images, tokens)
  with jax.set_mesh(mesh), nn.logical_axis_rules(DEFAULT_RULES):
    shardings = logical_shardings(abstract, mesh, DEFAULT_RULES)
    params = jax.jit(model.init, out_shardings=shardings)(_key(2), images,
                                                          tokens)
    outputs = jax.jit(model.apply)(params, images, tokens)
  return params, outputs


@pytest.fixture(scope="module")
def model_and_params(sharded):
  """The same params gathered onto one device."""
  local = jax.device_put(jax.device_get(sharded[0]), jax.devices()[0])
  return CLIP(**TINY), local


@pytest.fixture(scope="module")
def apply_fn(model_and_params):
  return jax.jit(model_and_params[0].apply)


@pytest.fixture(scope="module")
def encode_text_fn(model_and_params):
  model = model_and_params[0]
  return jax.jit(lambda p, t: model.apply(p, t, method=CLIP.encode_text))


def _transformer_params(width, depth, mlp_ratio):
  hidden = int(width * mlp_ratio)
  attention = 4 * (width * width + width)  # q, k, v, out with biases
  mlp = width * hidden + hidden + hidden * width + width
  return depth * (attention + mlp + 2 * 2 * width)  # + two LayerNorms


def _expected_clip_params(c):
  num_patches = (c["image_size"] // c["patch_size"]) ** 2
  vw, tw = c["vision_width"], c["text_width"]
  vision = (c["patch_size"] ** 2 * 3 * vw  # patch projection, no bias
            + vw  # class token
            + (num_patches + 1) * vw  # positions
            + 2 * vw  # ln_pre
            + _transformer_params(vw, c["vision_depth"], c["mlp_ratio"])
            + 2 * vw  # ln_post
            + vw * c["embed_dim"])  # projection, no bias
  text = (c["vocab_size"] * tw + c["context_length"] * tw
          + _transformer_params(tw, c["text_depth"], c["mlp_ratio"])
          + 2 * tw  # ln_final
          + tw * c["embed_dim"])
  return vision, text, vision + text + 1  # + the logit scale


def _count(tree):
  return sum(math.prod(x.shape) for x in jax.tree.leaves(nn.unbox(tree)))


def test_every_param_has_logical_names():
  model = CLIP(**TINY)
  abstract = jax.eval_shape(model.init, _key(0), *_inputs())
  is_box = lambda x: isinstance(x, nn.LogicallyPartitioned)
  leaves = jax.tree.leaves(abstract, is_leaf=is_box)
  assert leaves and all(is_box(leaf) for leaf in leaves)
  assert all(len(leaf.names) == leaf.value.ndim for leaf in leaves)


def test_paper_clip_parameter_count():
  model = CLIP(**PAPER)
  abstract = jax.eval_shape(
      model.init, _key(0),
      jax.ShapeDtypeStruct((1, 256, 256, 3), jnp.float32),
      jax.ShapeDtypeStruct((1, 77), jnp.int32))["params"]
  vision, text, total = _expected_clip_params(PAPER)
  assert _count(abstract["vision"]) == vision
  assert _count(abstract["text"]) == text
  assert _count(abstract) == total
  assert abs(total - 986e6) / 986e6 < 0.03
  print(f"paper CLIP params: {total:,} (vision {vision:,}, text {text:,})")


def test_outputs_and_methods(model_and_params, apply_fn, encode_text_fn):
  model, params = model_and_params
  images, tokens = _inputs()
  z_image, z_text, scale = apply_fn(params, images, tokens)
  assert z_image.shape == z_text.shape == (BATCH, TINY["embed_dim"])
  assert z_image.dtype == z_text.dtype == scale.dtype == jnp.float32
  np.testing.assert_allclose(jnp.linalg.norm(z_image, axis=-1), 1, atol=1e-5)
  np.testing.assert_allclose(jnp.linalg.norm(z_text, axis=-1), 1, atol=1e-5)
  assert scale.shape == ()
  np.testing.assert_allclose(scale, math.exp(LOGIT_SCALE_INIT), rtol=1e-6)

  z_image_alone = jax.jit(lambda p, x: model.apply(
      p, x, method=CLIP.encode_image))(params, images)
  z_text_alone, encodings = encode_text_fn(params, tokens)
  np.testing.assert_allclose(z_image_alone, z_image, atol=1e-6)
  np.testing.assert_allclose(z_text_alone, z_text, atol=1e-6)
  assert encodings.shape == (BATCH, TINY["context_length"], TINY["text_width"])

  clamped = jax.tree.map(lambda x: x, params)
  clamped["params"]["log_logit_scale"] = nn.LogicallyPartitioned(
      jnp.float32(10.0), ())
  np.testing.assert_allclose(apply_fn(clamped, images, tokens)[2], 100.0,
                             rtol=1e-5)


def test_end_token_index():
  _, tokens = _inputs()
  np.testing.assert_array_equal(end_token_index(tokens, 0), [7, 4, 2, 0])


def test_text_tower_is_causal(model_and_params, encode_text_fn):
  _, params = model_and_params
  _, tokens = _inputs()
  tokens = jnp.where(tokens == 0, 5, tokens)  # no padding
  base = encode_text_fn(params, tokens)[1]
  for j in (1, 4, 7):
    changed = encode_text_fn(
        params, tokens.at[:, j].set(tokens[:, j] % 63 + 1))[1]
    np.testing.assert_array_equal(changed[:, :j], base[:, :j])
    assert np.abs(changed[:, j] - base[:, j]).max() > 1e-4


def test_sharded_matches_unsharded(sharded, apply_fn):
  params, outputs = sharded
  attention = params["params"]["vision"]["transformer"]["blocks"]["attention"]
  qkv = attention["qkv_kernel"].value  # [layers, embed, 3, heads, kv]
  assert qkv.sharding.spec == PartitionSpec(None, "fsdp", None, "tensor", None)
  assert len(qkv.sharding.device_set) == 8
  local = jax.device_put(jax.device_get(nn.unbox(params)), jax.devices()[0])
  for a, b in zip(outputs, apply_fn(local, *_inputs())):
    np.testing.assert_allclose(a, b, atol=1e-5)


def test_scan_and_loop_agree(model_and_params, apply_fn):
  _, params = model_and_params
  images, tokens = _inputs()
  looped_model = CLIP(**TINY, scan_layers=False)
  looped = jax.jit(looped_model.apply)(unscan_params(nn.unbox(params)),
                                       images, tokens)
  for a, b in zip(looped, apply_fn(params, images, tokens)):
    np.testing.assert_allclose(a, b, atol=1e-5)


def test_bfloat16_close_to_float32(model_and_params, apply_fn):
  _, params = model_and_params
  images, tokens = _inputs()
  low = jax.jit(CLIP(**TINY, dtype=jnp.bfloat16).apply)(params, images,
                                                         tokens)
  for a, b in zip(low[:2], apply_fn(params, images, tokens)[:2]):
    assert a.dtype == jnp.float32
    # Unit vectors: a few bf16 ulps of difference.
    np.testing.assert_allclose(a, b, atol=5e-2)
