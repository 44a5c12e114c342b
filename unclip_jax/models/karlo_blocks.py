"""Blocks of Karlo's decoder and super-resolution UNets, in diffusers' math.

Karlo (Kakao Brain's unCLIP) ships in diffusers' layout: a `ResnetBlock` that
may resample inside itself and takes the timestep embedding either as a shift
before its second norm ("default") or as a scale and shift after it
("scale_shift"), and an `Attention` layer whose keys and values are the image's
own followed by none or some projected context tokens (diffusers' "added KV"
attention). Images are NHWC. Parameters keep the layouts of unet_blocks.py and
attention.py, so the same sharding rules apply.
"""
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from unclip_jax.models import precision
from unclip_jax.models.attention import fan_in_init, param
from unclip_jax.models.unet_blocks import (IMAGE_AXES, conv, downsample,
                                          image_and_context_attention, upsample)
from unclip_jax.parallel.axes import CONV_OUT, EMBED, NORM

Dtype = Any

zeros = nn.initializers.zeros
ones = nn.initializers.ones


def group_norm(groups: int, eps: float, name: str) -> nn.GroupNorm:
  """GroupNorm in float32, with torch's two-pass variance (not E[x^2] - E[x]^2,
  which loses digits when a channel's mean is large against its spread)."""
  return nn.GroupNorm(num_groups=groups, epsilon=eps, dtype=jnp.float32,
                      use_fast_variance=False,
                      scale_init=nn.with_logical_partitioning(ones, (NORM,)),
                      bias_init=nn.with_logical_partitioning(zeros, (NORM,)),
                      name=name)


class ResnetBlock(nn.Module):
  """diffusers' ResnetBlock2D (swish, pre-norm, output scale 1).

  GroupNorm -> SiLU -> [resample h and the input] -> conv1; the embedding
  (SiLU -> Linear) either shifts conv1's output before norm2 ("default") or
  scales and shifts norm2's output ("scale_shift"); then SiLU -> conv2, plus the
  input, 1x1-projected (`skip`) when the width changes.
  Params: in_norm, in_conv, emb_kernel [emb, n, out] (n = 2 for scale and
  shift, else 1), emb_bias [n, out], out_norm, out_conv, skip.
  """
  out_channels: int
  norm_groups: int
  norm_eps: float = 1e-5
  scale_shift: bool = False
  resample: str | None = None  # None | 'down' | 'up'
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, emb: jax.Array) -> jax.Array:
    """x [batch, height, width, channels], emb [batch, emb_width]
    -> [batch, height', width', out_channels] (sides halved or doubled)."""
    x = nn.with_logical_constraint(x, IMAGE_AXES)
    h = nn.silu(group_norm(self.norm_groups, self.norm_eps, "in_norm")(x))
    h = h.astype(self.dtype)
    if self.resample == "down":  # 2x2 average pool, as Downsample2D without conv
      h, x = downsample(h), downsample(x)
    elif self.resample == "up":  # nearest neighbour, as Upsample2D without conv
      h, x = upsample(h), upsample(x)
    h = conv(self.out_channels, 3, self.dtype, "in_conv")(h)
    h = nn.with_logical_constraint(h, IMAGE_AXES)

    parts = 2 if self.scale_shift else 1
    kernel = param(self, "emb_kernel", fan_in_init([0]),
                   (emb.shape[-1], parts, self.out_channels), (EMBED, None, CONV_OUT))
    bias = param(self, "emb_bias", zeros, (parts, self.out_channels), (None, CONV_OUT))
    emb_out = (precision.einsum("be,eto->bto", nn.silu(emb).astype(self.dtype),
                                kernel.astype(self.dtype)) + bias)
    emb_out = emb_out[:, :, None, None].astype(self.dtype)  # [b, n, 1, 1, out]
    out_norm = group_norm(self.norm_groups, self.norm_eps, "out_norm")
    if self.scale_shift:
      h = out_norm(h) * (1 + emb_out[:, 0]) + emb_out[:, 1]
    else:
      h = out_norm(h + emb_out[:, 0])
    h = nn.silu(h).astype(self.dtype)
    h = conv(self.out_channels, 3, self.dtype, "out_conv", zero_init=True)(h)

    if x.shape[-1] != self.out_channels:
      x = conv(self.out_channels, 1, self.dtype, "skip")(x)
    return nn.with_logical_constraint(x.astype(self.dtype) + h, IMAGE_AXES)


class Attention(nn.Module):
  """diffusers' spatial Attention with group norm and a residual.

  The image (group-normed) gives the queries and its own keys / values
  (`qkv_*`); with a `context`, each layer projects it to extra keys and values
  (`context_kv_*`, diffusers' add_k_proj / add_v_proj) placed BEFORE the image's
  (AttnAddedKVProcessor). Without context_width it is plain self-attention
  (UNetMidBlock2D's). Output projection `out_*`, then the residual.
  """
  head_dim: int
  norm_groups: int
  norm_eps: float = 1e-5
  context_width: int = 0  # 0: self-attention only
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, context: jax.Array | None = None,
               context_mask: jax.Array | None = None) -> jax.Array:
    """x [b, h, w, c]; context [b, m, context_width]; context_mask bool [b, m]
    (True = a real token) -> [b, h, w, c]."""
    channels = x.shape[-1]
    if channels % self.head_dim:
      raise ValueError(f"attention_head_dim={self.head_dim} must divide the "
                       f"{channels} channels of an attention layer")
    if bool(self.context_width) != (context is not None):
      raise ValueError("a cross-attention UNet needs encoder_hidden_states and a "
                       "self-attention one takes none")
    x = nn.with_logical_constraint(x, IMAGE_AXES)
    normed = group_norm(self.norm_groups, self.norm_eps, "norm")(x)
    # diffusers pads the context mask's additive bias with zeros for the image's
    # own keys: the same as attending them always.
    return image_and_context_attention(self, x, normed, context, context_mask,
                                       head_dim=self.head_dim, dtype=self.dtype)
