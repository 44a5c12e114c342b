"""Building blocks of the GLIDE/ADM UNet: layers, ResBlock, attention, caption encoder.

Every parameter is declared with logical axis names (see `unclip_jax.parallel.axes`),
so the config's rules decide how it is sharded. Images are NHWC. Attention is
attention.py's and the caption encoder is transformer.py's stack, shared with
the CLIP towers and the prior.
"""
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from unclip_jax.models import attention, precision
# fan_in_init, param and layer_norm are also imported from here (unet.py).
from unclip_jax.models.attention import HEAD_AXES, fan_in_init, param
from unclip_jax.models.transformer import TransformerStack, layer_norm
from unclip_jax.parallel.axes import (ACT_BATCH, ACT_CHANNELS, ACT_EMBED, ACT_HEIGHT,
                                      ACT_LENGTH, ACT_WIDTH, CONV_IN, CONV_OUT, EMBED,
                                      MLP, NORM, VOCAB)

Dtype = Any
IMAGE_AXES = (ACT_BATCH, ACT_HEIGHT, ACT_WIDTH, ACT_CHANNELS)
SEQUENCE_AXES = (ACT_BATCH, ACT_LENGTH, ACT_EMBED)

zeros = nn.initializers.zeros
ones = nn.initializers.ones


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


class Dense(nn.Module):
  """x @ kernel + bias, kernel axes (in_axis, out_axis); f32 accumulation."""
  features: int
  axes: tuple[str | None, str | None] = (EMBED, MLP)
  dtype: Dtype = jnp.float32
  zero_init: bool = False

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    init = zeros if self.zero_init else fan_in_init([0])
    kernel = param(self, "kernel", init, (x.shape[-1], self.features), self.axes)
    bias = param(self, "bias", zeros, (self.features,), self.axes[1:])
    y = precision.einsum("...c,co->...o", x.astype(self.dtype),
                         kernel.astype(self.dtype))
    return (y + bias).astype(self.dtype)


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
    scale_shift = (precision.einsum("be,eto->bto", nn.silu(emb).astype(self.dtype),
                                    kernel.astype(self.dtype))
                   + bias).astype(self.dtype)
    scale, shift = scale_shift[:, 0, None, None], scale_shift[:, 1, None, None]
    h = group_norm(self.norm_groups, "out_norm")(h) * (1 + scale) + shift
    h = nn.silu(h).astype(self.dtype)
    h = nn.Dropout(self.dropout)(h, deterministic=deterministic)
    h = conv(self.out_channels, 3, self.dtype, "out_conv", zero_init=True)(h)

    if x.shape[-1] != self.out_channels:
      x = conv(self.out_channels, 1, self.dtype, "skip")(x)
    return nn.with_logical_constraint(x.astype(self.dtype) + h, IMAGE_AXES)


class AttentionBlock(nn.Module):
  """ADM/GLIDE spatial self-attention; the context adds its own keys/values.

  Each block projects the context tokens (image + caption tokens) to extra
  keys and values (GLIDE's encoder_kv) placed before the spatial ones. Params
  (attention.py's layout): `qkv_*`, `context_kv_*`, zero-initialised `out_*`.
  """
  head_channels: int
  norm_groups: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, context: jax.Array | None = None,
               context_mask: jax.Array | None = None) -> jax.Array:
    """x [b, h, w, c]; context [b, m, ctx_width]; context_mask bool [b, m]."""
    channels = x.shape[-1]
    if channels % self.head_channels:
      raise ValueError(f"head_channels={self.head_channels} must divide the "
                       f"{channels} channels of an attention layer")
    x = nn.with_logical_constraint(x, IMAGE_AXES)
    normed = group_norm(self.norm_groups, "norm")(x)
    return image_and_context_attention(self, x, normed, context, context_mask,
                                       head_dim=self.head_channels,
                                       dtype=self.dtype)


def image_and_context_attention(module: nn.Module, x: jax.Array, normed: jax.Array,
                                context: jax.Array | None,
                                context_mask: jax.Array | None, *, head_dim: int,
                                dtype: Dtype) -> jax.Array:
  """x + attention of the normed image `normed` [b, h, w, c] over its own keys
  and values (`qkv_*`) and, given a context [b, m, ctx_width], the context's
  (`context_kv_*`, placed first; GLIDE's encoder_kv, diffusers' added KV), padded
  context tokens (context_mask False) hidden; output `out_*`, zero-initialised
  so that each layer starts as the identity. Called inside `module`'s compact
  __call__, which owns the params."""
  batch, height, width, channels = x.shape
  heads = dict(num_heads=channels // head_dim, head_dim=head_dim, dtype=dtype)
  h = normed.astype(dtype).reshape(batch, height * width, channels)
  q, k, v = attention.project_heads(module, h, num_outputs=3, name="qkv", **heads)
  mask = None
  if context is not None:
    context_k, context_v = attention.project_heads(
        module, context, num_outputs=2, name="context_kv", **heads)
    k = jnp.concatenate([context_k, k], axis=1)
    v = jnp.concatenate([context_v, v], axis=1)
    if context_mask is not None:
      # The image's own keys are always attended.
      key_mask = jnp.concatenate(
          [context_mask.astype(bool), jnp.ones((batch, height * width), bool)],
          axis=1)
      mask = key_mask[:, None, None, :]
  out = nn.with_logical_constraint(
      attention.dot_product_attention(q, k, v, mask), HEAD_AXES)
  out = attention.merge_heads(module, out, features=channels, dtype=dtype,
                              name="out", kernel_init=zeros)
  out = out.reshape(batch, height, width, channels)
  return nn.with_logical_constraint(x.astype(dtype) + out, IMAGE_AXES)


class CaptionEncoder(nn.Module):
  """GLIDE's caption transformer: tokens -> (token sequence, pooled vector).

  Pad id 0 is masked as a key and its input replaced by a learned padding
  embedding (GLIDE's xf_padding). The blocks are transformer.py's
  `TransformerStack` (bidirectional, run under nn.scan with params stacked on
  LAYERS) under `transformer`, then `final_norm`. The pooled vector is the last
  position's output, as GLIDE (which then replaces ADM's class embedding with it).
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
    if self.width % self.heads:
      raise ValueError(f"text_heads={self.heads} must divide text_width={self.width}")
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
    # Keys only, as GLIDE: a pad query (the pooled last position of a short
    # caption) attends to the real tokens, not to itself as a [B, L] mask
    # through make_attention_mask would add.
    x = TransformerStack(self.width, self.depth, self.heads, dtype=self.dtype,
                         remat_policy=self.remat_policy, name="transformer")(
                             x, mask[:, None, None, :])
    x = layer_norm(self.dtype, "final_norm")(x)
    return x, x[:, -1], mask
