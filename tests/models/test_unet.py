"""GLIDE/ADM UNet: named params, shapes, guidance drops, sharding, paper sizes."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec

from unclip_jax.models.unet import UNet
from unclip_jax.parallel import axes
from unclip_jax.parallel.axes import DEFAULT_RULES
from unclip_jax.parallel.mesh import make_mesh
from unclip_jax.parallel.partitioning import batch_sharding, logical_shardings

BATCH, SIDE, LENGTH = 4, 16, 8
DECODER = dict(base_channels=16, channel_mults=(1,), num_res_blocks=1,
               attention_resolutions=(SIDE,), resolution=SIDE, head_channels=8,
               norm_groups=4, out_channels=6, image_embedding_dim=16,
               vocab_size=64, context_length=LENGTH, text_width=32, text_depth=1,
               text_heads=2)
UPSAMPLER = dict(base_channels=8, channel_mults=(1, 2), num_res_blocks=1,
                 resolution=SIDE, norm_groups=4, low_res_conditioning=True)

# DALL-E 2 Table 3 (and GLIDE for the decoder's text transformer); the
# decoder's vocabulary is the paper CLIP's, as configs/decoder.py:paper builds it.
PAPER_DECODER = dict(base_channels=512, channel_mults=(1, 2, 3, 4), num_res_blocks=3,
                     attention_resolutions=(32, 16, 8), resolution=64,
                     head_channels=64, dropout=0.1, out_channels=6,
                     image_embedding_dim=1024, num_image_tokens=4, vocab_size=49408,
                     context_length=256, text_width=2048, text_depth=24,
                     text_heads=32)
PAPER_UPSAMPLER_256 = dict(base_channels=320, channel_mults=(1, 2, 3, 4),
                           num_res_blocks=3, resolution=256, dropout=0.1,
                           low_res_conditioning=True)
PAPER_UPSAMPLER_1024 = dict(base_channels=192, channel_mults=(1, 1, 2, 2, 4, 4),
                            num_res_blocks=2, resolution=1024,
                            low_res_conditioning=True)


def _is_box(x):
  return isinstance(x, nn.LogicallyPartitioned)


def _random_params(abstract, seed=0):
  """Numpy-drawn params in the init's boxes (no RNG kernels to compile).

  Nonzero everywhere: the zero-init output convs would otherwise hide every
  input from the output.
  """
  rng = np.random.default_rng(seed)
  return jax.tree.map(
      lambda leaf: jnp.asarray(rng.normal(0, 0.2, leaf.shape), leaf.dtype), abstract)


def _decoder_inputs(seed=0):
  rng = np.random.default_rng(seed)
  tokens = rng.integers(1, DECODER["vocab_size"], (BATCH, LENGTH))
  tokens[:, 5:] = 0  # padded captions
  return dict(
      x=jnp.asarray(rng.normal(size=(BATCH, SIDE, SIDE, 3)), jnp.float32),
      timesteps=jnp.array([0, 10, 500, 999], jnp.int32),
      image_embedding=jnp.asarray(rng.normal(size=(BATCH, 16)), jnp.float32),
      tokens=jnp.asarray(tokens, jnp.int32))


def _init_abstract(model, **inputs):
  x, timesteps = inputs.pop("x"), inputs.pop("timesteps")
  return jax.eval_shape(
      lambda: model.init(jax.random.key(0), x, timesteps, **inputs))


def _forward(model):
  def forward(params, x, timesteps, image_embedding, tokens,
              drop_image_embedding, drop_text):
    return model.apply(params, x, timesteps, image_embedding=image_embedding,
                       tokens=tokens, drop_image_embedding=drop_image_embedding,
                       drop_text=drop_text)
  return forward


# Rows 0, 1 drop z_i; rows 0, 2 drop the caption.
DROP_IMAGE = jnp.array([True, True, False, False])
DROP_TEXT = jnp.array([True, False, True, False])


@pytest.fixture(scope="module")
def decoder():
  """(model, abstract params, params, inputs, single-device output)."""
  model = UNet(**DECODER)
  inputs = _decoder_inputs()
  abstract = _init_abstract(model, **inputs)
  params = _random_params(abstract)
  forward = jax.jit(_forward(model))
  output = forward(params, **inputs, drop_image_embedding=DROP_IMAGE,
                   drop_text=DROP_TEXT)
  return model, abstract, params, inputs, forward, output


def test_every_param_is_logically_partitioned(decoder):
  _, abstract, *_ = decoder
  upsampler = _init_abstract(UNet(**UPSAMPLER), x=jnp.zeros((2, SIDE, SIDE, 3)),
                             timesteps=jnp.zeros((2,), jnp.int32),
                             low_res=jnp.zeros((2, 4, 4, 3)))
  known = {getattr(axes, name) for name in dir(axes) if name.isupper()
           and isinstance(getattr(axes, name), str)} | {None}
  for tree in (abstract, upsampler):
    leaves = jax.tree.leaves(tree["params"], is_leaf=_is_box)
    assert leaves and all(_is_box(leaf) for leaf in leaves)
    for leaf in leaves:
      assert len(leaf.names) == leaf.value.ndim
      assert set(leaf.names) <= known, leaf.names
  caption_blocks = abstract["params"]["caption_encoder"]["transformer"]["blocks"]
  scanned = caption_blocks["attention"]["qkv_kernel"]
  assert scanned.names == (axes.LAYERS, axes.EMBED, None, axes.HEADS, axes.KV)
  attention = abstract["params"]["down_0_attn_0"]
  assert attention["context_kv_kernel"].names == (axes.EMBED, None, axes.HEADS,
                                                  axes.KV)
  assert attention["out_kernel"].names == (axes.HEADS, axes.KV, axes.EMBED)


def test_decoder_output_and_guidance_drops(decoder):
  _, _, params, inputs, forward, output = decoder
  assert output.shape == (BATCH, SIDE, SIDE, 6) and output.dtype == jnp.float32
  assert np.isfinite(output).all()
  other = _decoder_inputs(seed=1)
  drops = dict(drop_image_embedding=DROP_IMAGE, drop_text=DROP_TEXT)
  new_image = forward(params, **dict(inputs, image_embedding=other["image_embedding"]),
                      **drops)
  new_text = forward(params, **dict(inputs, tokens=other["tokens"]), **drops)

  def row_diff(a, b):
    return np.abs(np.asarray(a) - np.asarray(b)).reshape(BATCH, -1).max(axis=1)

  # Dropped rows ignore the input; kept rows depend on it.
  np.testing.assert_array_equal(row_diff(output, new_image)[:2], 0)
  assert (row_diff(output, new_image)[2:] > 1e-4).all()
  np.testing.assert_array_equal(row_diff(output, new_text)[[0, 2]], 0)
  assert (row_diff(output, new_text)[[1, 3]] > 1e-4).all()


@pytest.mark.parametrize("mesh_shape", [(2, 2, 2), (1, 4, 2)])
def test_sharded_forward_matches_single_device(decoder, mesh_shape):
  model, abstract, params, inputs, _, reference = decoder
  mesh = make_mesh(mesh_shape)
  with jax.set_mesh(mesh), nn.logical_axis_rules(DEFAULT_RULES):
    shardings = logical_shardings(abstract, mesh, DEFAULT_RULES)
    sharded = jax.device_put(params, shardings)
    qkv = sharded["params"]["down_0_attn_0"]["qkv_kernel"].value
    assert qkv.sharding.spec == PartitionSpec("fsdp", None, "tensor", None)
    conv = sharded["params"]["up_0_res_0"]["in_conv"]["kernel"].value
    assert conv.sharding.spec == PartitionSpec(None, None, "fsdp", "tensor")
    forward = jax.jit(_forward(model), out_shardings=batch_sharding(
        mesh, DEFAULT_RULES, 4))
    lowered = forward.lower(sharded, **inputs, drop_image_embedding=DROP_IMAGE,
                            drop_text=DROP_TEXT)
    assert "sharding_constraint" in lowered.as_text()  # activations constrained
    output = lowered.compile()(sharded, **inputs, drop_image_embedding=DROP_IMAGE,
                               drop_text=DROP_TEXT)
  np.testing.assert_allclose(output, reference, atol=2e-5, rtol=1e-5)


def test_upsampler_applies_at_twice_the_training_resolution():
  model = UNet(**UPSAMPLER, dtype=jnp.bfloat16)
  abstract = _init_abstract(model, x=jnp.zeros((2, SIDE, SIDE, 3)),
                            timesteps=jnp.zeros((2,), jnp.int32),
                            low_res=jnp.zeros((2, SIDE // 4, SIDE // 4, 3)))
  assert "caption_encoder" not in abstract["params"]
  assert not any("attn" in name for name in abstract["params"])
  params = _random_params(abstract)
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(2, 2 * SIDE, 2 * SIDE, 3)), jnp.float32)
  low_res = jnp.asarray(rng.uniform(-1, 1, (2, SIDE // 2, SIDE // 2, 3)), jnp.float32)
  output = jax.jit(lambda p: model.apply(p, x, jnp.array([3, 700]),
                                         low_res=low_res))(params)
  assert output.shape == (2, 2 * SIDE, 2 * SIDE, 3) and output.dtype == jnp.float32
  assert np.isfinite(output).all() and np.abs(output).max() > 0


def test_config_errors_are_explained():
  x, t = jnp.zeros((1, SIDE, SIDE, 3)), jnp.zeros((1,), jnp.int32)
  with pytest.raises(ValueError, match="norm_groups"):
    _init_abstract(UNet(**dict(UPSAMPLER, low_res_conditioning=False, norm_groups=3)),
                   x=x, timesteps=t)
  with pytest.raises(ValueError, match="attention_resolutions"):
    _init_abstract(UNet(**dict(DECODER, attention_resolutions=(32,))), x=x,
                   timesteps=t)
  with pytest.raises(ValueError, match="divisible"):
    _init_abstract(UNet(**dict(UPSAMPLER, low_res_conditioning=False)),
                   x=jnp.zeros((1, 9, 9, 3)), timesteps=t)


def _param_count(config, side, low_res_side=None, text=False, image_dim=0):
  x = jnp.zeros((1, side, side, 3))
  inputs = dict(x=x, timesteps=jnp.zeros((1,), jnp.int32))
  if low_res_side:
    inputs["low_res"] = jnp.zeros((1, low_res_side, low_res_side, 3))
  if text:
    inputs["tokens"] = jnp.zeros((1, config["context_length"]), jnp.int32)
  if image_dim:
    inputs["image_embedding"] = jnp.zeros((1, image_dim))
  params = _init_abstract(UNet(**config), **inputs)["params"]
  return params, sum(leaf.size for leaf in jax.tree.leaves(params))


def test_paper_parameter_counts():
  # Nothing allocated: shapes only. Crops at 1/4 size (the upsamplers are
  # conv-only, so the count does not depend on the side).
  params, decoder = _param_count(PAPER_DECODER, 64, text=True, image_dim=1024)
  text = sum(leaf.size for leaf in jax.tree.leaves(params["caption_encoder"]))
  text_blocks = sum(leaf.size for leaf in jax.tree.leaves(
      params["caption_encoder"]["transformer"]["blocks"]))
  _, up_256 = _param_count(PAPER_UPSAMPLER_256, 64, low_res_side=16)
  _, up_1024 = _param_count(PAPER_UPSAMPLER_1024, 64, low_res_side=16)
  print(f"decoder {decoder / 1e9:.3f}B (text {text / 1e9:.3f}B, visual "
        f"{(decoder - text) / 1e9:.3f}B), upsampler 64->256 {up_256 / 1e6:.1f}M, "
        f"256->1024 {up_1024 / 1e6:.1f}M")
  assert abs(decoder / 3.5e9 - 1) < 0.1
  assert abs((decoder - text) / 2.3e9 - 1) < 0.1  # GLIDE: ~2.3B visual
  # GLIDE's ~1.2B text Transformer is its 24 blocks (the token table adds 0.1B).
  assert abs(text_blocks / 1.2e9 - 1) < 0.1
  assert abs(up_256 / 700e6 - 1) < 0.1
  assert abs(up_1024 / 300e6 - 1) < 0.1
  # Every paper-size param divides evenly on a (1, 4, 2) mesh (shard_shape raises).
  mesh = make_mesh((1, 4, 2))
  shardings = logical_shardings(params, mesh, DEFAULT_RULES)
  for leaf, sharding in zip(jax.tree.leaves(params), jax.tree.leaves(shardings)):
    sharding.shard_shape(leaf.shape)
  qkv = shardings["middle_attn"]["qkv_kernel"]
  assert qkv.spec == PartitionSpec("fsdp", None, "tensor", None)
