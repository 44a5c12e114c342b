"""The GLIDE/ADM UNet: DALL-E 2's decoder (64 px) and its upsamplers.

The decoder is GLIDE conditioned on CLIP's image embedding z_i: z_i is projected
and added to the timestep embedding, and projected into `num_image_tokens`
context tokens that join the caption encoder's token sequence; every attention
layer projects that context to its own extra keys and values. The upsamplers are
the same network with only convolutions, no text, no z_i, and the low-res image
(bilinearly upsampled) concatenated to the noisy input.
"""
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from unclip_jax.models import precision
from unclip_jax.models import remat as remat_lib
from unclip_jax.models.embeddings import timestep_embedding
from unclip_jax.models.unet_blocks import (IMAGE_AXES, AttentionBlock, CaptionEncoder,
                                           Dense, Dtype, ResBlock, conv, group_norm,
                                           param)
from unclip_jax.parallel.axes import ACT_BATCH, ACT_LENGTH, EMBED, MLP


class UNet(nn.Module):
  """ADM UNet with scale-shift norm, resblock up/down sampling and GLIDE context.

  `attention_resolutions` are feature-map sides at the training `resolution`
  (e.g. (32, 16, 8) at 64 px); the middle block has attention iff any level
  does. Output is float32 [batch, height, width, out_channels].
  """
  base_channels: int = 128
  channel_mults: Sequence[int] = (1, 2, 3, 4)
  num_res_blocks: int = 2
  attention_resolutions: Sequence[int] = ()
  resolution: int = 64  # training image side; places attention_resolutions
  head_channels: int = 64
  dropout: float = 0.0
  in_channels: int = 3
  out_channels: int = 3  # 6 with learned variance
  norm_groups: int = 32
  # CLIP image embedding z_i (0: none).
  image_embedding_dim: int = 0
  num_image_tokens: int = 4
  context_width: int = 512  # width of the image tokens when there is no caption
  # Caption pathway (text_depth 0: none).
  vocab_size: int = 0
  context_length: int = 0
  text_width: int = 0
  text_depth: int = 0
  text_heads: int = 1
  # Upsampler: concatenate the bilinearly upsampled low-res image to the input.
  low_res_conditioning: bool = False
  dtype: Dtype = jnp.float32
  # Recompute block activations in the backward pass: a policy name of
  # models/remat.py ("none" | "full" | "dots"), or a bool (True = "full").
  remat: bool | str = False

  @property
  def has_text(self) -> bool:
    return self.text_depth > 0

  def _attention_levels(self) -> set[int]:
    sides = {self.resolution // 2**level: level
             for level in range(len(self.channel_mults))}
    unknown = [side for side in self.attention_resolutions if side not in sides]
    if unknown:
      raise ValueError(f"attention_resolutions {unknown} are not feature-map sides "
                       f"{sorted(sides)} of a {self.resolution}px UNet with "
                       f"{len(self.channel_mults)} levels")
    return {sides[side] for side in self.attention_resolutions}

  def _check_widths(self):
    for mult in self.channel_mults:
      if (self.base_channels * mult) % self.norm_groups:
        raise ValueError(f"norm_groups={self.norm_groups} must divide every width "
                         f"base_channels * mult = {self.base_channels * mult}")

  def _time_embedding(self, timesteps: jax.Array) -> jax.Array:
    """int32 [batch] -> [batch, 4 * base_channels]."""
    emb_width = 4 * self.base_channels
    emb = timestep_embedding(timesteps, self.base_channels)
    emb = Dense(emb_width, (EMBED, MLP), self.dtype, name="time_embed_0")(emb)
    return Dense(emb_width, (MLP, EMBED), self.dtype,
                 name="time_embed_1")(nn.silu(emb))

  def _conditioning(self, batch, image_embedding, tokens, drop_image_embedding,
                    drop_text):
    """What depends on the condition alone, not on x_t or t: (added to the
    timestep embedding [batch, 4 * base_channels] or None, context
    [batch, m, w] | None, context mask bool [batch, m] | None)."""
    emb_width = 4 * self.base_channels
    emb = None
    context, context_mask = [], []

    if self.image_embedding_dim:
      null = param(self, "null_image_embedding",
                   nn.initializers.normal(self.image_embedding_dim**-0.5),
                   (self.image_embedding_dim,), (EMBED,))
      if image_embedding is None:  # unconditional: the null embedding
        image_embedding = jnp.broadcast_to(null, (batch, self.image_embedding_dim))
      if drop_image_embedding is not None:
        image_embedding = jnp.where(drop_image_embedding[:, None], null[None],
                                    image_embedding)
      image_embedding = image_embedding.astype(self.dtype)
      emb = Dense(emb_width, (EMBED, MLP), self.dtype,
                  name="image_embed")(image_embedding)
      if self.num_image_tokens:
        width = self.text_width if self.has_text else self.context_width
        kernel = param(self, "image_tokens_kernel", nn.initializers.normal(
            self.image_embedding_dim**-0.5), (self.image_embedding_dim,
                                              self.num_image_tokens, width),
                       (EMBED, None, MLP))
        bias = param(self, "image_tokens_bias", nn.initializers.zeros,
                     (self.num_image_tokens, width), (None, MLP))
        image_tokens = (precision.einsum("bd,dtw->btw", image_embedding,
                                         kernel.astype(self.dtype))
                        + bias).astype(self.dtype)
        context.append(image_tokens)
        context_mask.append(jnp.ones((batch, self.num_image_tokens), bool))
    elif image_embedding is not None:
      raise ValueError("image_embedding given to a UNet with image_embedding_dim=0")

    if self.has_text:
      if tokens is None:  # unconditional: the all-pad caption
        tokens = jnp.zeros((batch, self.context_length), jnp.int32)
      if drop_text is not None:
        tokens = jnp.where(drop_text[:, None], 0, tokens)
      text, pooled, text_mask = CaptionEncoder(
          self.vocab_size, self.context_length, self.text_width, self.text_depth,
          self.text_heads, self.dtype, remat_lib.policy_name(self.remat),
          name="caption_encoder")(tokens)
      text_emb = Dense(emb_width, (EMBED, MLP), self.dtype, name="text_embed")(pooled)
      emb = text_emb if emb is None else emb + text_emb
      context.append(text)
      context_mask.append(text_mask)
    elif tokens is not None:
      raise ValueError("tokens given to a UNet with text_depth=0")

    if not context:
      return emb, None, None
    context = nn.with_logical_constraint(jnp.concatenate(context, axis=1),
                                         (ACT_BATCH, ACT_LENGTH, None))
    return emb, context, jnp.concatenate(context_mask, axis=1)

  @nn.compact
  def __call__(self, x: jax.Array | None, timesteps: jax.Array | None, *,
               image_embedding: jax.Array | None = None,
               tokens: jax.Array | None = None,
               low_res: jax.Array | None = None,
               drop_image_embedding: jax.Array | None = None,
               drop_text: jax.Array | None = None,
               deterministic: bool = True,
               conditioning: tuple | None = None,
               return_conditioning: bool = False):
    """Predicts the diffusion target from a noisy image.

    Args:
      x: noisy image [batch, height, width, in_channels].
      timesteps: int32 [batch].
      image_embedding: CLIP z_i [batch, image_embedding_dim]; None = null.
      tokens: caption int32 [batch, length], pad id 0; None = empty caption.
      low_res: [batch, h, w, 3] low-resolution image (upsamplers).
      drop_image_embedding, drop_text: bool [batch], classifier-free guidance
        drops (z_i -> learned null embedding; caption -> all-pad caption).
      deterministic: False enables dropout (needs a 'dropout' rng).
      conditioning: what `return_conditioning=True` returned for the same
        condition, in place of image_embedding, tokens and the drops: a sampler
        computes it once, not at every step.
      return_conditioning: return only the condition's part (x, timesteps
        unused): a pytree of [batch, ...] arrays.
    Returns:
      float32 [batch, height, width, out_channels].
    """
    if return_conditioning:
      rows = next(a for a in (image_embedding, tokens, drop_image_embedding,
                              drop_text) if a is not None).shape[0]
      return self._conditioning(rows, image_embedding, tokens,
                                drop_image_embedding, drop_text)
    self._check_widths()
    attention_levels = self._attention_levels()
    batch, height, width, _ = x.shape
    factor = 2**(len(self.channel_mults) - 1)
    if height % factor or width % factor:
      raise ValueError(f"image sides ({height}, {width}) must be divisible by "
                       f"{factor} for {len(self.channel_mults)} levels")
    if self.low_res_conditioning:
      if low_res is None:
        raise ValueError("this UNet is an upsampler: pass low_res")
      low_res = jax.image.resize(low_res.astype(jnp.float32),
                                 (batch, height, width, low_res.shape[-1]), "bilinear")
      x = jnp.concatenate([x, low_res.astype(x.dtype)], axis=-1)
    if x.shape[-1] != self.in_channels + 3 * self.low_res_conditioning:
      raise ValueError(f"input has {x.shape[-1]} channels, expected in_channels="
                       f"{self.in_channels} (+3 low-res)")

    if conditioning is None:
      conditioning = self._conditioning(batch, image_embedding, tokens,
                                        drop_image_embedding, drop_text)
    condition_emb, context, context_mask = conditioning
    emb = self._time_embedding(timesteps)
    if condition_emb is not None:
      emb = emb + condition_emb
    res_block = remat_lib.remat(ResBlock, self.remat, static_argnums=(3,))
    attn_block = remat_lib.remat(AttentionBlock, self.remat)

    def resnet(h, channels, name, resample=None):
      return res_block(channels, self.norm_groups, self.dropout, resample,
                       self.dtype, name=name)(h, emb, deterministic)

    def attend(h, name):
      return attn_block(self.head_channels, self.norm_groups, self.dtype,
                        name=name)(h, context, context_mask)

    h = nn.with_logical_constraint(x.astype(self.dtype), IMAGE_AXES[:3] + (None,))
    h = conv(self.base_channels * self.channel_mults[0], 3, self.dtype, "conv_in",
             in_axis=None)(h)
    skips = [h]
    last = len(self.channel_mults) - 1
    for level, mult in enumerate(self.channel_mults):
      for i in range(self.num_res_blocks):
        h = resnet(h, self.base_channels * mult, f"down_{level}_res_{i}")
        if level in attention_levels:
          h = attend(h, f"down_{level}_attn_{i}")
        skips.append(h)
      if level != last:
        h = resnet(h, h.shape[-1], f"down_{level}_downsample", "down")
        skips.append(h)

    h = resnet(h, h.shape[-1], "middle_res_0")
    if attention_levels:
      h = attend(h, "middle_attn")
    h = resnet(h, h.shape[-1], "middle_res_1")

    for level, mult in reversed(list(enumerate(self.channel_mults))):
      for i in range(self.num_res_blocks + 1):
        h = jnp.concatenate([h, skips.pop()], axis=-1)
        h = resnet(h, self.base_channels * mult, f"up_{level}_res_{i}")
        if level in attention_levels:
          h = attend(h, f"up_{level}_attn_{i}")
      if level:
        h = resnet(h, h.shape[-1], f"up_{level}_upsample", "up")

    h = nn.silu(group_norm(self.norm_groups, "out_norm")(h)).astype(self.dtype)
    h = conv(self.out_channels, 3, self.dtype, "conv_out", zero_init=True,
             out_axis=None)(h)
    return h.astype(jnp.float32)
