"""CLIP: the image and text towers and a learned temperature."""
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from unclip_jax.errors import ConfigError
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


# OpenAI CLIP's pixel statistics (of [0, 1] RGB), which its checkpoints (and
# transformers' CLIPImageProcessor) normalise images by.
OPENAI_IMAGE_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_IMAGE_STD = (0.26862954, 0.26130258, 0.27577711)

TEXT_ONLY_HELP = (
    "this CLIP was converted from a text encoder alone (model.vision_depth=0), so "
    "it has no image tower; to encode images convert a whole CLIP checkpoint "
    "(transformers CLIPModel, or an OpenAI / open_clip state dict) with "
    "unclip_jax.convert.clip")


class CLIP(nn.Module):
  """Both CLIP towers. The paper's model is ViT-H/16 at 256 px (width 1280,
  32 blocks, 16 heads) and a causal text transformer (width 1024, 24 blocks,
  16 heads), embed_dim 1024.

  Use `model.apply(params, images, method=CLIP.encode_image)` (or
  `encode_text`) to run one tower; `init` through `__call__` creates both.

  Options that let it run converted OpenAI / open_clip / transformers
  checkpoints exactly (the defaults are our own CLIP's): `activation` ("gelu" |
  "quick_gelu"), `layer_norm_eps`, per-tower `vision_mlp_ratio` /
  `text_mlp_ratio` (None: `mlp_ratio`), `text_pooling` (models/text.py POOLINGS)
  with `end_id`, `text_key_padding_mask`, and `image_mean` / `image_std` (RGB,
  of [0, 1] pixels; None: the tower reads our [-1, 1] images as they are).
  `vision_depth=0` is a text-only CLIP (no image tower, no temperature): init
  it with `method=CLIP.text_features`; its image methods raise ConfigError.
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
  activation: str = "gelu"
  layer_norm_eps: float = 1e-5
  vision_mlp_ratio: float | None = None
  text_mlp_ratio: float | None = None
  text_pooling: str = "last_non_pad"
  end_id: int = 2
  text_key_padding_mask: bool = True
  image_mean: tuple[float, float, float] | None = None
  image_std: tuple[float, float, float] | None = None

  @property
  def has_image_tower(self) -> bool:
    return self.vision_depth > 0

  def setup(self):
    if (self.image_mean is None) != (self.image_std is None):
      raise ConfigError("model.image_mean and model.image_std are set together "
                        "(both RGB triples) or not at all")
    if self.has_image_tower:
      self.vision = VisionTransformer(
          image_size=self.image_size, patch_size=self.patch_size,
          width=self.vision_width, depth=self.vision_depth,
          num_heads=self.vision_heads, output_dim=self.embed_dim,
          mlp_ratio=self.vision_mlp_ratio or self.mlp_ratio, dtype=self.dtype,
          remat_policy=self.remat_policy, scan_layers=self.scan_layers,
          activation=self.activation, layer_norm_eps=self.layer_norm_eps)
      # The log of the temperature's inverse; a scalar, replicated.
      self.log_logit_scale = self.param(
          "log_logit_scale",
          nn.with_logical_partitioning(
              nn.initializers.constant(LOGIT_SCALE_INIT), ()),
          (), jnp.float32)
    self.text = TextTransformer(
        vocab_size=self.vocab_size, context_length=self.context_length,
        width=self.text_width, depth=self.text_depth,
        num_heads=self.text_heads, output_dim=self.embed_dim,
        mlp_ratio=self.text_mlp_ratio or self.mlp_ratio, pad_id=self.pad_id,
        dtype=self.dtype, remat_policy=self.remat_policy,
        scan_layers=self.scan_layers, pooling=self.text_pooling,
        end_id=self.end_id, key_padding_mask=self.text_key_padding_mask,
        activation=self.activation, layer_norm_eps=self.layer_norm_eps)

  def _require_image_tower(self) -> None:
    if not self.has_image_tower:
      raise ConfigError(TEXT_ONLY_HELP)

  def _normalise_pixels(self, images: jnp.ndarray) -> jnp.ndarray:
    """[-1, 1] images as the tower expects them: unchanged, or (x+1)/2
    standardised by image_mean / image_std (in float32)."""
    if self.image_mean is None:
      return images
    mean = jnp.asarray(self.image_mean, jnp.float32)
    std = jnp.asarray(self.image_std, jnp.float32)
    return ((images.astype(jnp.float32) + 1.0) * 0.5 - mean) / std

  def image_features(self, images: jnp.ndarray,
                     deterministic: bool = True) -> jnp.ndarray:
    """images: float [batch, H, W, 3] in [-1, 1] -> the projected class token
    [batch, embed_dim] float32, not normalised (transformers' `image_embeds`
    of CLIPVisionModelWithProjection)."""
    self._require_image_tower()
    return self.vision(self._normalise_pixels(images), deterministic)

  def text_features(self, tokens: jnp.ndarray, deterministic: bool = True
                    ) -> tuple[jnp.ndarray, jnp.ndarray]:
    """tokens: int32 [batch, context_length], right-padded ->
    (the projected pooled state [batch, embed_dim] float32, not normalised
     (transformers' `text_embeds` of CLIPTextModelWithProjection),
     token_encodings [batch, context_length, text_width] float32, after the
     final LayerNorm (its `last_hidden_state`))."""
    return self.text(tokens, deterministic)

  def encode_image(self, images: jnp.ndarray,
                   deterministic: bool = True) -> jnp.ndarray:
    """images: float [batch, H, W, 3] in [-1, 1] -> z_i [batch, embed_dim],
    L2-normalised, float32."""
    return l2_normalize(self.image_features(images, deterministic))

  def encode_text(self, tokens: jnp.ndarray, deterministic: bool = True
                  ) -> tuple[jnp.ndarray, jnp.ndarray]:
    """tokens: int32 [batch, context_length], right-padded with pad_id ->
    (z_t [batch, embed_dim] L2-normalised float32,
     token_encodings [batch, context_length, text_width] float32)."""
    pooled, token_encodings = self.text_features(tokens, deterministic)
    return l2_normalize(pooled), token_encodings

  def logit_scale(self) -> jnp.ndarray:
    """exp(log scale clamped at log 100): a float32 scalar."""
    self._require_image_tower()
    return jnp.exp(jnp.minimum(self.log_logit_scale, LOGIT_SCALE_MAX))

  def __call__(self, images: jnp.ndarray, tokens: jnp.ndarray,
               deterministic: bool = True
               ) -> tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray]:
    """-> (z_i [batch, embed_dim], z_t [batch, embed_dim], logit_scale [])."""
    z_image = self.encode_image(images, deterministic)
    z_text, _ = self.encode_text(tokens, deterministic)
    return z_image, z_text, self.logit_scale()
