"""Building blocks of the GLIDE/ADM UNet: layers, ResBlock, attention, caption encoder.

Every parameter is declared with logical axis names (see `unclip_jax.parallel.axes`),
so the config's rules decide how it is sharded. Images are NHWC.
"""
import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from unclip_jax.models import remat as remat_lib
from unclip_jax.parallel.axes import (ACT_BATCH, ACT_CHANNELS, ACT_EMBED, ACT_HEADS,
                                      ACT_HEIGHT, ACT_LENGTH, ACT_MLP, ACT_WIDTH,
                                      CONV_IN, CONV_OUT, EMBED, HEADS, KV, LAYERS, MLP,
                                      NORM, VOCAB)

Dtype = Any
IMAGE_AXES = (ACT_BATCH, ACT_HEIGHT, ACT_WIDTH, ACT_CHANNELS)
SEQUENCE_AXES = (ACT_BATCH, ACT_LENGTH, ACT_EMBED)
HEAD_AXES = (ACT_BATCH, ACT_LENGTH, ACT_HEADS, None)

zeros = nn.initializers.zeros
ones = nn.initializers.ones


def fan_in_init(fan_in_axes: Sequence[int]):
  """Normal init with variance 1 / (product of the `fan_in_axes` dims)."""
  def init(key, shape, dtype=jnp.float32):
    fan_in = math.prod(shape[axis] for axis in fan_in_axes)
    return jax.random.normal(key, shape, dtype) / math.sqrt(fan_in)
  return init


def param(module: nn.Module, name: str, init, shape: Sequence[int],
          axes: Sequence[str | None]) -> jax.Array:
  """A float32 parameter boxed with its logical axis names."""
  return module.param(name, nn.with_logical_partitioning(init, tuple(axes)),
                      tuple(shape), jnp.float32)


def conv(features: int, kernel_size: int, dtype: Dtype, name: str,
         zero_init: bool = False, in_axis: str | None = CONV_IN,
         out_axis: str | None = CONV_OUT) -> nn.Conv:
  """A 'SAME' conv with kernel axes (None, None, in_axis, out_axis).

  The image-side convs pass None for their 3 (or 6) RGB channels, which no
  mesh axis divides.
  """
  kernel_init = zeros if zero_init else nn.initializers.lecun_normal()
  return nn.Conv(
      features, (kernel_size, kernel_size), padding="SAME", dtype=dtype,
      kernel_init=nn.with_logical_partitioning(kernel_init,
                                               (None, None, in_axis, out_axis)),
      bias_init=nn.with_logical_partitioning(zeros, (out_axis,)), name=name)


def group_norm(groups: int, name: str) -> nn.GroupNorm:
  """GroupNorm computed in float32 (as ADM's GroupNorm32)."""
  return nn.GroupNorm(num_groups=groups, epsilon=1e-5, dtype=jnp.float32,
                      scale_init=nn.with_logical_partitioning(ones, (NORM,)),
                      bias_init=nn.with_logical_partitioning(zeros, (NORM,)),
                      name=name)


def layer_norm(name: str) -> nn.LayerNorm:
  return nn.LayerNorm(epsilon=1e-5, dtype=jnp.float32,
                      scale_init=nn.with_logical_partitioning(ones, (NORM,)),
                      bias_init=nn.with_logical_partitioning(zeros, (NORM,)),
                      name=name)


class Dense(nn.Module):
  """x @ kernel + bias, kernel axes (in_axis, out_axis)."""
  features: int
  axes: tuple[str | None, str | None] = (EMBED, MLP)
  dtype: Dtype = jnp.float32
  zero_init: bool = False

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    init = zeros if self.zero_init else fan_in_init([0])
    kernel = param(self, "kernel", init, (x.shape[-1], self.features), self.axes)
    bias = param(self, "bias", zeros, (self.features,), self.axes[1:])
    return (jnp.dot(x.astype(self.dtype), kernel.astype(self.dtype))
            + bias.astype(self.dtype))


def downsample(x: jax.Array) -> jax.Array:
  return nn.avg_pool(x, (2, 2), strides=(2, 2))


def upsample(x: jax.Array) -> jax.Array:
  return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)


class ResBlock(nn.Module):
  """ADM residual block with scale-shift norm and optional down/up sampling.

  GroupNorm -> SiLU -> [resample] -> conv -> GroupNorm * (1 + scale) + shift
  -> SiLU -> dropout -> zero-init conv, plus the (resampled, 1x1-projected when
  the width changes) input.
  """
  out_channels: int
  norm_groups: int
  dropout: float = 0.0
  resample: str | None = None  # None | 'down' | 'up'
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, emb: jax.Array,
               deterministic: bool = True) -> jax.Array:
    """x [batch, height, width, channels], emb [batch, emb_width]."""
    x = nn.with_logical_constraint(x, IMAGE_AXES)
    h = nn.silu(group_norm(self.norm_groups, "in_norm")(x)).astype(self.dtype)
    if self.resample == "down":
      h, x = downsample(h), downsample(x)
    elif self.resample == "up":
      h, x = upsample(h), upsample(x)
    h = conv(self.out_channels, 3, self.dtype, "in_conv")(h)
    h = nn.with_logical_constraint(h, IMAGE_AXES)

    # Scale and shift from the timestep (+ image, + caption) embedding; the
    # kernel keeps (scale, shift) on their own axis so the channel axis shards.
    emb_width = emb.shape[-1]
    kernel = param(self, "emb_kernel", fan_in_init([0]),
                   (emb_width, 2, self.out_channels), (EMBED, None, CONV_OUT))
    bias = param(self, "emb_bias", zeros, (2, self.out_channels), (None, CONV_OUT))
    scale_shift = (jnp.einsum("be,eto->bto", nn.silu(emb).astype(self.dtype),
                              kernel.astype(self.dtype)) + bias.astype(self.dtype))
    scale, shift = scale_shift[:, 0, None, None], scale_shift[:, 1, None, None]
    h = group_norm(self.norm_groups, "out_norm")(h) * (1 + scale) + shift
    h = nn.silu(h).astype(self.dtype)
    h = nn.Dropout(self.dropout)(h, deterministic=deterministic)
    h = conv(self.out_channels, 3, self.dtype, "out_conv", zero_init=True)(h)

    if x.shape[-1] != self.out_channels:
      x = conv(self.out_channels, 1, self.dtype, "skip")(x)
    return nn.with_logical_constraint(x.astype(self.dtype) + h, IMAGE_AXES)


def attention(q: jax.Array, k: jax.Array, v: jax.Array,
              key_mask: jax.Array | None) -> jax.Array:
  """Softmax attention in float32. q [b, l, h, d], k/v [b, m, h, d], mask [b, m]."""
  logits = jnp.einsum("blhd,bmhd->bhlm", q, k,
                      preferred_element_type=jnp.float32) / math.sqrt(q.shape[-1])
  if key_mask is not None:
    # A finite floor keeps a fully masked row (an all-pad caption) finite.
    logits = jnp.where(key_mask[:, None, None, :], logits,
                       jnp.finfo(jnp.float32).min)
  weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
  return jnp.einsum("bhlm,bmhd->blhd", weights, v)


class AttentionBlock(nn.Module):
  """ADM/GLIDE spatial self-attention; the context adds its own keys/values.

  Each block projects the context tokens (caption + image tokens) to extra
  keys and values (GLIDE's encoder_kv) placed before the spatial ones.
  """
  head_channels: int
  norm_groups: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, context: jax.Array | None = None,
               context_mask: jax.Array | None = None) -> jax.Array:
    """x [b, h, w, c]; context [b, m, ctx_width]; context_mask bool [b, m]."""
    batch, height, width, channels = x.shape
    if channels % self.head_channels:
      raise ValueError(f"head_channels={self.head_channels} must divide the "
                       f"{channels} channels of an attention layer")
    heads = channels // self.head_channels
    x = nn.with_logical_constraint(x, IMAGE_AXES)
    h = group_norm(self.norm_groups, "norm")(x).astype(self.dtype)
    h = h.reshape(batch, height * width, channels)
    head_shape = (heads, self.head_channels)
    qkv_kernel = param(self, "qkv_kernel", fan_in_init([0]),
                       (channels, 3) + head_shape, (EMBED, None, HEADS, KV))
    qkv_bias = param(self, "qkv_bias", zeros, (3,) + head_shape, (None, HEADS, KV))
    qkv = (jnp.einsum("blc,cthd->tblhd", h, qkv_kernel.astype(self.dtype))
           + qkv_bias.astype(self.dtype)[:, None, None])
    q, k, v = (nn.with_logical_constraint(t, HEAD_AXES) for t in qkv)
    key_mask = None
    if context is not None:
      kv_kernel = param(self, "context_kv_kernel", fan_in_init([0]),
                        (context.shape[-1], 2) + head_shape, (EMBED, None, HEADS, KV))
      kv_bias = param(self, "context_kv_bias", zeros, (2,) + head_shape,
                      (None, HEADS, KV))
      context_k, context_v = (
          jnp.einsum("bmc,cthd->tbmhd", context.astype(self.dtype),
                     kv_kernel.astype(self.dtype))
          + kv_bias.astype(self.dtype)[:, None, None])
      k = jnp.concatenate([context_k, k], axis=1)
      v = jnp.concatenate([context_v, v], axis=1)
      if context_mask is not None:
        key_mask = jnp.concatenate(
            [context_mask, jnp.ones((batch, height * width), bool)], axis=1)
    out = nn.with_logical_constraint(attention(q, k, v, key_mask), HEAD_AXES)
    out_kernel = param(self, "out_kernel", zeros, head_shape + (channels,),
                       (HEADS, KV, EMBED))
    out_bias = param(self, "out_bias", zeros, (channels,), (EMBED,))
    out = (jnp.einsum("blhd,hdc->blc", out, out_kernel.astype(self.dtype))
           + out_bias.astype(self.dtype))
    out = out.reshape(batch, height, width, channels)
    return nn.with_logical_constraint(x.astype(self.dtype) + out, IMAGE_AXES)


class TextBlock(nn.Module):
  """Pre-LayerNorm transformer block (bidirectional, pad keys masked)."""
  heads: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, key_mask: jax.Array):
    """x [batch, length, width], key_mask bool [batch, length]."""
    width = x.shape[-1]
    if width % self.heads:
      raise ValueError(f"text_heads={self.heads} must divide text_width={width}")
    head_shape = (self.heads, width // self.heads)
    h = layer_norm("attn_norm")(x).astype(self.dtype)
    qkv_kernel = param(self, "qkv_kernel", fan_in_init([0]), (width, 3) + head_shape,
                       (EMBED, None, HEADS, KV))
    qkv_bias = param(self, "qkv_bias", zeros, (3,) + head_shape, (None, HEADS, KV))
    qkv = (jnp.einsum("blc,cthd->tblhd", h, qkv_kernel.astype(self.dtype))
           + qkv_bias.astype(self.dtype)[:, None, None])
    q, k, v = (nn.with_logical_constraint(t, HEAD_AXES) for t in qkv)
    out = attention(q, k, v, key_mask)
    out_kernel = param(self, "out_kernel", fan_in_init([0, 1]),
                       head_shape + (width,), (HEADS, KV, EMBED))
    out_bias = param(self, "out_bias", zeros, (width,), (EMBED,))
    x = x + (jnp.einsum("blhd,hdc->blc", out, out_kernel.astype(self.dtype))
             + out_bias.astype(self.dtype))
    x = nn.with_logical_constraint(x, SEQUENCE_AXES)

    h = layer_norm("mlp_norm")(x).astype(self.dtype)
    h = nn.gelu(Dense(4 * width, (EMBED, MLP), self.dtype, name="mlp_in")(h))
    h = nn.with_logical_constraint(h, (ACT_BATCH, ACT_LENGTH, ACT_MLP))
    x = x + Dense(width, (MLP, EMBED), self.dtype, name="mlp_out")(h)
    return nn.with_logical_constraint(x, SEQUENCE_AXES), None


class CaptionEncoder(nn.Module):
  """GLIDE's caption transformer: tokens -> (token sequence, pooled vector).

  Pad id 0 is masked as a key and its input replaced by a learned padding
  embedding (GLIDE's xf_padding). The pooled vector is the last position's
  output, as GLIDE (which then replaces ADM's class embedding with it).
  Blocks run under nn.scan: one compiled block, params stacked on LAYERS.
  """
  vocab_size: int
  context_length: int
  width: int
  depth: int
  heads: int
  dtype: Dtype = jnp.float32
  remat_policy: str = "none"  # models/remat.py

  @nn.compact
  def __call__(self, tokens: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """tokens int [batch, length] -> ([batch, length, width], [batch, width], mask)."""
    length = tokens.shape[1]
    if length > self.context_length:
      raise ValueError(f"caption of {length} tokens > context_length="
                       f"{self.context_length}")
    mask = tokens != 0
    embed_init = nn.initializers.normal(0.02)
    # Rows padded to a multiple of 128 so that the VOCAB axis shards evenly.
    rows = -(-self.vocab_size // 128) * 128
    token_embedding = param(self, "token_embedding", embed_init,
                            (rows, self.width), (VOCAB, EMBED))
    positions = param(self, "positional_embedding", nn.initializers.normal(0.01),
                      (self.context_length, self.width), (None, EMBED))
    padding = param(self, "padding_embedding", nn.initializers.normal(0.01),
                    (self.context_length, self.width), (None, EMBED))
    x = jnp.take(token_embedding, tokens, axis=0) + positions[None, :length]
    x = jnp.where(mask[..., None], x, padding[None, :length]).astype(self.dtype)
    x = nn.with_logical_constraint(x, SEQUENCE_AXES)
    # Under scan, remat needs no CSE barrier (prevent_cse=False).
    block = remat_lib.remat(TextBlock, self.remat_policy, prevent_cse=False)
    blocks = nn.scan(block, variable_axes={"params": 0},
                     split_rngs={"params": True}, in_axes=nn.broadcast,
                     length=self.depth, metadata_params={nn.PARTITION_NAME: LAYERS})
    x, _ = blocks(self.heads, self.dtype, name="blocks")(x, mask)
    x = layer_norm("final_norm")(x).astype(self.dtype)
    return x, x[:, -1], mask
