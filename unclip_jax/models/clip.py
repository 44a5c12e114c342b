"""CLIP: the image and text towers and a learned temperature."""
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from unclip_jax.models.text import TextTransformer
from unclip_jax.models.vit import VisionTransformer

Dtype = Any

LOGIT_SCALE_INIT = math.log(1 / 0.07)
LOGIT_SCALE_MAX = math.log(100.0)


def l2_normalize(x: jnp.ndarray, eps: float = 1e-12) -> jnp.ndarray:
  """x / |x| over the last axis, in float32."""
  x = x.astype(jnp.float32)
  return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True),
                                       eps))


def l2_normalize_host(x, eps: float = 1e-12) -> np.ndarray:
  """`l2_normalize` in numpy, for evaluation and sampling code on the host (no
  device computation, so none placed on a caller's mesh)."""
  x = np.asarray(x, np.float32)
  return x / np.sqrt(np.maximum(np.sum(x * x, axis=-1, keepdims=True), eps))


class CLIP(nn.Module):
  """Both CLIP towers. The paper's model is ViT-H/16 at 256 px (width 1280,
  32 blocks, 16 heads) and a causal text transformer (width 1024, 24 blocks,
  16 heads), embed_dim 1024.

  Use `model.apply(params, images, method=CLIP.encode_image)` (or
  `encode_text`) to run one tower; `init` through `__call__` creates both.
  """
  embed_dim: int
  image_size: int
  patch_size: int
  vision_width: int
  vision_depth: int
  vision_heads: int
  text_width: int
  text_depth: int
  text_heads: int
  vocab_size: int
  context_length: int
  mlp_ratio: float = 4.0
  pad_id: int = 0
  dtype: Dtype = jnp.float32
  remat_policy: str = "none"
  scan_layers: bool = True

  def setup(self):
    self.vision = VisionTransformer(
        image_size=self.image_size, patch_size=self.patch_size,
        width=self.vision_width, depth=self.vision_depth,
        num_heads=self.vision_heads, output_dim=self.embed_dim,
        mlp_ratio=self.mlp_ratio, dtype=self.dtype,
        remat_policy=self.remat_policy, scan_layers=self.scan_layers)
    self.text = TextTransformer(
        vocab_size=self.vocab_size, context_length=self.context_length,
        width=self.text_width, depth=self.text_depth,
        num_heads=self.text_heads, output_dim=self.embed_dim,
        mlp_ratio=self.mlp_ratio, pad_id=self.pad_id, dtype=self.dtype,
        remat_policy=self.remat_policy, scan_layers=self.scan_layers)
    # The log of the temperature's inverse; a scalar, replicated.
    self.log_logit_scale = self.param(
        "log_logit_scale",
        nn.with_logical_partitioning(
            nn.initializers.constant(LOGIT_SCALE_INIT), ()),
        (), jnp.float32)

  def encode_image(self, images: jnp.ndarray,
                   deterministic: bool = True) -> jnp.ndarray:
    """images: float [batch, H, W, 3] in [-1, 1] -> z_i [batch, embed_dim],
    L2-normalised, float32."""
    return l2_normalize(self.vision(images, deterministic))

  def encode_text(self, tokens: jnp.ndarray, deterministic: bool = True
                  ) -> tuple[jnp.ndarray, jnp.ndarray]:
    """tokens: int32 [batch, context_length], right-padded with pad_id ->
    (z_t [batch, embed_dim] L2-normalised float32,
     token_encodings [batch, context_length, text_width] float32)."""
    pooled, token_encodings = self.text(tokens, deterministic)
    return l2_normalize(pooled), token_encodings

  def logit_scale(self) -> jnp.ndarray:
    """exp(log scale clamped at log 100): a float32 scalar."""
    return jnp.exp(jnp.minimum(self.log_logit_scale, LOGIT_SCALE_MAX))

  def __call__(self, images: jnp.ndarray, tokens: jnp.ndarray,
               deterministic: bool = True
               ) -> tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray]:
    """-> (z_i [batch, embed_dim], z_t [batch, embed_dim], logit_scale [])."""
    z_image = self.encode_image(images, deterministic)
    z_text, _ = self.encode_text(tokens, deterministic)
    return z_image, z_text, self.logit_scale()
