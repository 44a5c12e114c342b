"""attention.py: the shared softmax attention against a numpy reference, and
the transformer's and the UNet's attention layers computing the same thing."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from unclip_jax.models.attention import dot_product_attention
from unclip_jax.models.precision import dtype_named
from unclip_jax.models.transformer import MultiHeadAttention
from unclip_jax.models.unet_blocks import AttentionBlock, CaptionEncoder

BATCH, QUERIES, KEYS, HEADS, HEAD_DIM = 2, 5, 7, 3, 4


def _numpy_attention(q, k, v, mask):
  """Naive float64 softmax attention; a fully masked row averages every key."""
  q, k, v = (np.asarray(t, np.float64) for t in (q, k, v))
  logits = np.einsum("blhd,bmhd->bhlm", q, k) / np.sqrt(q.shape[-1])
  mask = np.broadcast_to(mask, logits.shape)
  logits = np.where(mask, logits, -np.inf)
  empty = ~mask.any(-1, keepdims=True)
  logits = np.where(empty, 0.0, logits)  # no key allowed: uniform weights
  weights = np.exp(logits - logits.max(-1, keepdims=True))
  weights /= weights.sum(-1, keepdims=True)
  return np.einsum("bhlm,bmhd->blhd", weights, v)


def test_attention_matches_numpy_with_padding_and_an_empty_row():
  rng = np.random.default_rng(0)
  q = rng.normal(size=(BATCH, QUERIES, HEADS, HEAD_DIM)).astype(np.float32)
  k = rng.normal(size=(BATCH, KEYS, HEADS, HEAD_DIM)).astype(np.float32)
  v = rng.normal(size=(BATCH, KEYS, HEADS, HEAD_DIM)).astype(np.float32)
  key_mask = np.ones((BATCH, KEYS), bool)
  key_mask[0, 4:] = False  # a padded row
  key_mask[1, :] = False  # an all-pad caption
  mask = key_mask[:, None, None, :]
  got = np.asarray(jax.jit(dot_product_attention)(q, k, v, mask))
  assert np.isfinite(got).all()
  np.testing.assert_allclose(got, _numpy_attention(q, k, v, mask), atol=1e-5)
  np.testing.assert_allclose(got[1], np.broadcast_to(v[1].mean(0), got[1].shape),
                             atol=1e-5)
  np.testing.assert_allclose(dot_product_attention(q, k, v),
                             _numpy_attention(q, k, v, True), atol=1e-5)
  # A per-query mask, broadcast over heads.
  causal = np.tril(np.ones((QUERIES, KEYS), bool))[None, None]
  np.testing.assert_allclose(dot_product_attention(q, k, v, causal),
                             _numpy_attention(q, k, v, causal), atol=1e-5)
  low = dot_product_attention(*(jnp.asarray(t, jnp.bfloat16) for t in (q, k, v)),
                              mask)
  assert low.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(low, np.float32), got, atol=5e-2)


SIDE, CHANNELS, GROUPS = 4, 12, 3


@pytest.fixture(scope="module")
def block_params():
  """AttentionBlock params with a nonzero output projection (it is zero-init)."""
  x = jnp.zeros((BATCH, SIDE, SIDE, CHANNELS))
  params = AttentionBlock(HEAD_DIM, GROUPS).init(jax.random.key(0), x)
  assert not np.asarray(nn.unbox(params)["params"]["out_kernel"]).any()
  rng = np.random.default_rng(1)
  return jax.tree.map(lambda p: jnp.asarray(rng.normal(0, 0.3, p.shape),
                                            jnp.float32), nn.unbox(params))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_attention_block_and_multi_head_attention_agree(block_params, dtype):
  """Without context AttentionBlock is x + MultiHeadAttention(GroupNorm(x))
  with the same qkv / out params, in either dtype; bf16 stays near f32."""
  x = jnp.asarray(np.random.default_rng(2).normal(
      size=(BATCH, SIDE, SIDE, CHANNELS)), jnp.float32)
  normed = nn.GroupNorm(GROUPS, epsilon=1e-5).apply(
      {"params": block_params["params"]["norm"]}, x)
  tokens = normed.reshape(BATCH, SIDE * SIDE, CHANNELS)
  mha_params = {"params": {k: v for k, v in block_params["params"].items()
                           if k != "norm"}}
  outputs = {}
  for name in ("float32", dtype):
    compute = dtype_named(name)
    block = jax.jit(AttentionBlock(HEAD_DIM, GROUPS, dtype=compute).apply)
    mha = jax.jit(MultiHeadAttention(CHANNELS // HEAD_DIM, dtype=compute).apply)
    from_block = np.asarray(block(block_params, x), np.float32) - np.asarray(
        x.astype(compute), np.float32)
    from_mha = np.asarray(mha(mha_params, tokens.astype(compute), None),
                          np.float32).reshape(from_block.shape)
    outputs[name] = from_block, from_mha
  (block32, mha32), (block, mha) = outputs["float32"], outputs[dtype]
  np.testing.assert_allclose(block32, mha32, atol=1e-5)
  tolerance = 1e-5 if dtype == "float32" else 3e-2
  for low in (block, mha):
    assert np.linalg.norm(low - mha32) / np.linalg.norm(mha32) < tolerance
  np.testing.assert_allclose(block, mha, atol=10 * tolerance)


def test_masked_context_is_ignored(block_params):
  rng = np.random.default_rng(3)
  x = jnp.asarray(rng.normal(size=(BATCH, SIDE, SIDE, CHANNELS)), jnp.float32)
  context = jnp.asarray(rng.normal(size=(BATCH, 6, 8)), jnp.float32)
  model = AttentionBlock(HEAD_DIM, GROUPS)
  params = model.init(jax.random.key(0), x, context)
  params = jax.tree.map(lambda p: jnp.asarray(rng.normal(0, 0.3, p.shape),
                                              jnp.float32), nn.unbox(params))
  apply = jax.jit(model.apply)
  hidden = apply(params, x, context, jnp.zeros((BATCH, 6), bool))
  without = apply({"params": {k: v for k, v in params["params"].items()
                              if not k.startswith("context_kv")}}, x)
  np.testing.assert_allclose(hidden, without, atol=1e-5)
  seen = apply(params, x, context, jnp.ones((BATCH, 6), bool))
  assert np.abs(np.asarray(seen - without)).max() > 1e-3


def test_caption_encoder_masks_pad_keys_and_survives_an_empty_caption():
  tokens = jnp.array([[5, 9, 3, 0, 0, 0], [0, 0, 0, 0, 0, 0]], jnp.int32)
  model = CaptionEncoder(vocab_size=16, context_length=6, width=8, depth=2,
                         heads=2, remat_policy="full")
  params = nn.unbox(jax.jit(model.init)(jax.random.key(0), tokens))
  stacked = params["params"]["transformer"]["blocks"]["attention"]["qkv_kernel"]
  assert stacked.shape == (2, 8, 3, 2, 4)
  apply = jax.jit(model.apply)
  sequence, pooled, mask = apply(params, tokens)
  assert sequence.shape == (2, 6, 8) and pooled.shape == (2, 8)
  np.testing.assert_array_equal(mask, tokens != 0)
  assert np.isfinite(sequence).all()
  # Pad inputs (the learned padding embedding) never reach a real position.
  moved = jax.tree.map(lambda p: p, params)
  moved["params"]["padding_embedding"] = params["params"][
      "padding_embedding"] + 3.0
  moved_sequence, moved_pooled, _ = apply(moved, tokens)
  np.testing.assert_allclose(moved_sequence[0, :3], sequence[0, :3], atol=1e-5)
  assert np.abs(np.asarray(moved_pooled - pooled)).max() > 1e-3
