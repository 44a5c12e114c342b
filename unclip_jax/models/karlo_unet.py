"""Karlo's decoder and super-resolution UNets (diffusers' UNet2DConditionModel /
UNet2DModel with resnet-resampling blocks), NHWC.

The decoder (64 px) conditions on a timestep embedding plus `class_labels` (the
text projection's additive CLIP time embedding) and cross-attends, in every
attention layer, to the text projection's context tokens ("added KV": the
context's keys / values join the image's own). The super-resolution UNets
(64 -> 256 px) are the same network without attention or class labels, with the
upscaled low-res image concatenated to the noisy input (6 channels in).

Parameter names follow diffusers' block indices, so the converter is a table:
`down_{block}_res_{i}`, `down_{block}_attn_{i}`, `down_{block}_downsample`,
`mid_res_{0,1}`, `mid_attn`, `up_{block}_res_{i}`, `up_{block}_attn_{i}`,
`up_{block}_upsample`, where up block 0 is the lowest resolution (diffusers'
order).
"""
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from unclip_jax.models.embeddings import timestep_embedding
from unclip_jax.models.karlo_blocks import Attention, ResnetBlock, group_norm
from unclip_jax.models.unet_blocks import IMAGE_AXES, Dense, Dtype, conv
from unclip_jax.parallel.axes import ACT_BATCH, ACT_LENGTH, EMBED, MLP

MID_ATTENTION = ("none", "self", "cross")


class KarloUNet(nn.Module):
  """diffusers' UNet2DConditionModel (Karlo's decoder) or UNet2DModel (its
  super-resolution UNets) for the block types Karlo uses.

  Levels are `block_out_channels`; every level but the last ends in a
  downsampling resnet, every up block but the last in an upsampling one. The
  kwargs of a diffusers config come from
  `convert.karlo_unet.karlo_unet_kwargs_from_diffusers_config`.
  """
  in_channels: int = 3
  out_channels: int = 6  # 6: epsilon and the learned variance range
  block_out_channels: Sequence[int] = (320, 640, 960, 1280)
  layers_per_block: Sequence[int] = (3, 3, 3, 3)  # per down block; up blocks + 1
  down_attention: Sequence[bool] = (False, True, True, True)
  # Per up block, lowest resolution first (diffusers' up_block_types order).
  up_attention: Sequence[bool] = (True, True, True, False)
  mid_attention: str = "cross"  # 'cross' (added KV) | 'self' | 'none'
  attention_head_dim: int = 64
  cross_attention_dim: int = 1536  # 0: no cross-attention (super-resolution)
  norm_groups: int = 32
  norm_eps: float = 1e-5
  scale_shift: bool = True  # resnet_time_scale_shift "scale_shift" vs "default"
  time_embed_dim: int = 0  # 0: 4 * block_out_channels[0]
  class_embedding: bool = True  # class_labels added to the time embedding
  dtype: Dtype = jnp.float32

  def _check(self, x: jax.Array):
    levels = len(self.block_out_channels)
    for name in ("layers_per_block", "down_attention", "up_attention"):
      if len(getattr(self, name)) != levels:
        raise ValueError(f"{name} needs one entry per level ({levels})")
    if self.mid_attention not in MID_ATTENTION:
      raise ValueError(f"mid_attention={self.mid_attention!r}: use one of "
                       f"{MID_ATTENTION}")
    cross = (any(self.down_attention) or any(self.up_attention)
             or self.mid_attention == "cross")
    if cross and not self.cross_attention_dim:
      raise ValueError("cross-attention blocks need cross_attention_dim > 0")
    for channels in self.block_out_channels:
      if channels % self.norm_groups:
        raise ValueError(f"norm_groups={self.norm_groups} must divide every width "
                         f"of block_out_channels {tuple(self.block_out_channels)}")
    _, height, width, channels = x.shape
    factor = 2**(levels - 1)
    if height % factor or width % factor:
      raise ValueError(f"image sides ({height}, {width}) must be divisible by "
                       f"{factor} for {levels} levels")
    if channels != self.in_channels:
      raise ValueError(f"input has {channels} channels, expected in_channels="
                       f"{self.in_channels}")

  def _embedding(self, t: jax.Array, class_labels: jax.Array | None) -> jax.Array:
    """Timesteps int32 [batch] (+ class_labels) -> [batch, time_embed_dim]."""
    base = self.block_out_channels[0]
    width = self.time_embed_dim or 4 * base
    # diffusers' Timesteps with flip_sin_to_cos=True, freq_shift=0: cos, sin.
    emb = timestep_embedding(t, base)
    emb = Dense(width, (EMBED, MLP), self.dtype, name="time_embed_0")(emb)
    emb = Dense(width, (MLP, EMBED), self.dtype, name="time_embed_1")(nn.silu(emb))
    if self.class_embedding:
      if class_labels is None:
        raise ValueError("this UNet adds class_labels (Karlo's additive CLIP time "
                         "embeddings) to its time embedding: pass them")
      emb = emb + class_labels.astype(self.dtype)
    elif class_labels is not None:
      raise ValueError("class_labels given to a UNet without a class embedding")
    return emb

  @nn.compact
  def __call__(self, x: jax.Array, t: jax.Array,
               encoder_hidden_states: jax.Array | None = None,
               class_labels: jax.Array | None = None,
               attention_mask: jax.Array | None = None) -> jax.Array:
    """Predicts the diffusion target from a noisy image.

    Args:
      x: float [batch, height, width, in_channels] (the super-resolution UNets:
        noise and the upscaled low-res image, concatenated on channels).
      t: int32 [batch] timesteps.
      encoder_hidden_states: float [batch, tokens, cross_attention_dim], the
        context every cross-attention layer attends to (decoder only).
      class_labels: float [batch, time_embed_dim], added to the time embedding
        (decoder only).
      attention_mask: bool [batch, tokens], True for real context tokens.
    Returns:
      float32 [batch, height, width, out_channels].
    """
    self._check(x)
    batch = x.shape[0]
    emb = self._embedding(jnp.broadcast_to(t, (batch,)), class_labels)
    context = encoder_hidden_states
    if context is not None:
      if not self.cross_attention_dim:
        raise ValueError("encoder_hidden_states given to a UNet without "
                         "cross-attention")
      context = nn.with_logical_constraint(context.astype(self.dtype),
                                           (ACT_BATCH, ACT_LENGTH, None))

    def resnet(h, channels, name, resample=None):
      return ResnetBlock(channels, self.norm_groups, self.norm_eps, self.scale_shift,
                         resample, self.dtype, name=name)(h, emb)

    def attend(h, name, cross=True):
      return Attention(self.attention_head_dim, self.norm_groups, self.norm_eps,
                       self.cross_attention_dim if cross else 0, self.dtype,
                       name=name)(h, context if cross else None,
                                  attention_mask if cross else None)

    channels_0 = self.block_out_channels[0]
    h = nn.with_logical_constraint(x.astype(self.dtype), IMAGE_AXES[:3] + (None,))
    h = conv(channels_0, 3, self.dtype, "conv_in", in_axis=None)(h)
    skips = [h]
    last = len(self.block_out_channels) - 1
    for block, channels in enumerate(self.block_out_channels):
      for i in range(self.layers_per_block[block]):
        h = resnet(h, channels, f"down_{block}_res_{i}")
        if self.down_attention[block]:
          h = attend(h, f"down_{block}_attn_{i}")
        skips.append(h)
      if block != last:
        h = resnet(h, channels, f"down_{block}_downsample", "down")
        skips.append(h)

    h = resnet(h, h.shape[-1], "mid_res_0")
    if self.mid_attention != "none":
      h = attend(h, "mid_attn", cross=self.mid_attention == "cross")
    h = resnet(h, h.shape[-1], "mid_res_1")

    layers_up = list(reversed(self.layers_per_block))
    for block, channels in enumerate(reversed(self.block_out_channels)):
      for i in range(layers_up[block] + 1):
        h = jnp.concatenate([h, skips.pop()], axis=-1)
        h = resnet(h, channels, f"up_{block}_res_{i}")
        if self.up_attention[block]:
          h = attend(h, f"up_{block}_attn_{i}")
      if block != last:
        h = resnet(h, channels, f"up_{block}_upsample", "up")

    h = nn.silu(group_norm(self.norm_groups, self.norm_eps, "out_norm")(h))
    h = conv(self.out_channels, 3, self.dtype, "conv_out", out_axis=None)(
        h.astype(self.dtype))
    return h.astype(jnp.float32)
