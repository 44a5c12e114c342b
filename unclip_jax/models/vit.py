"""The CLIP image tower: a Vision Transformer pooled at its class token."""
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from unclip_jax.models.transformer import (TransformerStack, constrain_tokens,
                                           dense_init, layer_norm)
from unclip_jax.models.precision import dot_general_f32_accumulate
from unclip_jax.parallel.axes import EMBED, KEEP

Dtype = Any


class VisionTransformer(nn.Module):
  """ViT as in CLIP: patchify, class token, learned positions, ln_pre, stack,
  ln_post on the class token, bias-free projection to `output_dim`.

  The patch projection is a bias-free dense layer over flattened
  [patch, patch, 3] pixels, the same parameters as CLIP's stride-`patch_size`
  convolution. `activation` and `layer_norm_eps` are TransformerStack's (set
  from a converted checkpoint's config).
  """
  image_size: int
  patch_size: int
  width: int
  depth: int
  num_heads: int
  output_dim: int
  mlp_ratio: float = 4.0
  dropout: float = 0.0
  dtype: Dtype = jnp.float32
  remat_policy: str = "none"
  scan_layers: bool = True
  activation: str = "gelu"
  layer_norm_eps: float = 1e-5

  @property
  def num_patches(self) -> int:
    return (self.image_size // self.patch_size) ** 2

  @nn.compact
  def __call__(self, images: jnp.ndarray,
               deterministic: bool = True) -> jnp.ndarray:
    """images: float [batch, H, W, 3] in [-1, 1] -> [batch, output_dim]
    float32 (not normalised)."""
    batch, height, width_px, channels = images.shape
    if height != self.image_size or width_px != self.image_size:
      raise ValueError(f"images are {height}x{width_px}, the model expects "
                       f"{self.image_size}x{self.image_size}")
    if self.image_size % self.patch_size:
      raise ValueError(f"image_size {self.image_size} is not a multiple of "
                       f"patch_size {self.patch_size}")
    side = self.image_size // self.patch_size
    p = self.patch_size
    # [B, H, W, C] -> [B, side*side, p*p*C], row-major patches.
    patches = images.reshape(batch, side, p, side, p, channels)
    patches = patches.transpose(0, 1, 3, 2, 4, 5).reshape(
        batch, side * side, p * p * channels)
    x = nn.Dense(
        self.width, use_bias=False, dtype=self.dtype, name="patch_embedding",
        dot_general=dot_general_f32_accumulate,
        kernel_init=nn.with_logical_partitioning(dense_init, (KEEP, EMBED)),
    )(patches.astype(self.dtype))

    scale = self.width ** -0.5
    class_token = self.param(
        "class_token",
        nn.with_logical_partitioning(nn.initializers.normal(scale), (EMBED,)),
        (self.width,))
    positions = self.param(
        "position_embedding",
        nn.with_logical_partitioning(nn.initializers.normal(scale),
                                     (KEEP, EMBED)),
        (self.num_patches + 1, self.width))
    class_tokens = jnp.broadcast_to(class_token.astype(x.dtype),
                                    (batch, 1, self.width))
    x = jnp.concatenate([class_tokens, x], axis=1)
    x = constrain_tokens(x + positions.astype(x.dtype)[None])
    x = layer_norm(self.dtype, "ln_pre", self.layer_norm_eps)(x)

    x = TransformerStack(
        width=self.width, depth=self.depth, num_heads=self.num_heads,
        mlp_ratio=self.mlp_ratio, dropout=self.dropout, dtype=self.dtype,
        remat_policy=self.remat_policy, scan_layers=self.scan_layers,
        activation=self.activation, layer_norm_eps=self.layer_norm_eps,
        name="transformer")(x, None, deterministic)

    pooled = layer_norm(self.dtype, "ln_post", self.layer_norm_eps)(x[:, 0])
    projected = nn.Dense(
        self.output_dim, use_bias=False, dtype=self.dtype, name="projection",
        dot_general=dot_general_f32_accumulate,
        kernel_init=nn.with_logical_partitioning(dense_init, (EMBED, KEEP)),
    )(pooled)
    return projected.astype(jnp.float32)
