"""Kakao Brain's Karlo prior: the diffusion prior of diffusers'
`PriorTransformer` as Karlo configures it, so that converted Karlo weights
(convert/karlo_prior.py) run here with the same outputs.

The same family as prior.py's model, a causal pre-LN transformer over

    [text encodings (L), text embedding, timestep, noised embedding, prd token]

read out at the last (prd) token. It differs in what it conditions on (no
learned null caption: guidance runs the empty prompt's encodings through the
same weights) and in carrying the statistics of CLIP image embeddings
(`clip_mean`, `clip_std`): it predicts the clean embedding in the
standardised space, and `unnormalize` maps a sample back to CLIP's.
"""
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from unclip_jax.models.embeddings import timestep_embedding
from unclip_jax.models.prior import PrefixCache, dense
from unclip_jax.models.transformer import (TransformerStack, constrain_tokens,
                                           layer_norm)
from unclip_jax.parallel.axes import EMBED, KEEP, MLP

Dtype = Any

# Tokens after the text encodings: text embedding, timestep, noised
# embedding, prd token (diffusers' `additional_embeddings`).
NUM_EXTRA_TOKENS = 4


def _mish(x: jnp.ndarray) -> jnp.ndarray:
  return x * jnp.tanh(jax.nn.softplus(x))


# The activations diffusers' config may name for the timestep MLP.
TIME_ACTIVATIONS = {
    "silu": nn.silu,
    "swish": nn.silu,
    "gelu": functools.partial(nn.gelu, approximate=False),
    "relu": nn.relu,
    "mish": _mish,
}


class KarloPrior(nn.Module):
  """diffusers' `PriorTransformer` with a text mask (always causal).

  Attention is `num_heads` x `head_dim` wide (width); the blocks are
  transformer.py's (pre-LN, exact GELU MLP of 4x width), scanned with
  `scan_layers`. Karlo's values: embedding_dim 768, 32 heads of 64, depth 20,
  context_length 77, everything else at its default (the preset in
  convert/karlo_prior.py).

  Masking: a query sees earlier positions only, and never a padded text
  token. diffusers writes this as an additive -10000 bias; here it is a hard
  mask (transformer.make_attention_mask). The two differ only on the rows of
  padded text tokens, whose states no real query ever reads, so the
  prediction is the same.
  """
  embedding_dim: int  # noised embedding and text encodings' width
  num_heads: int
  head_dim: int
  depth: int
  context_length: int  # text tokens (diffusers' num_embeddings)
  time_embed_dim: int | None = None  # timestep MLP hidden width; None: width
  text_embedding_dim: int | None = None  # None: embedding_dim
  clip_embed_dim: int | None = None  # output width; None: embedding_dim
  time_activation: str = "silu"  # a key of TIME_ACTIVATIONS
  norm_in: bool = False  # LayerNorm on the tokens before the blocks
  text_embedding_norm: bool = False  # LayerNorm on the text embedding
  dtype: Dtype = jnp.float32
  remat_policy: str = "none"
  scan_layers: bool = True

  @property
  def width(self) -> int:
    return self.num_heads * self.head_dim

  @property
  def sequence_length(self) -> int:
    return self.context_length + NUM_EXTRA_TOKENS

  @property
  def output_dim(self) -> int:
    return self.clip_embed_dim or self.embedding_dim

  def setup(self):
    if self.time_activation not in TIME_ACTIVATIONS:
      raise ValueError(f"time_activation {self.time_activation!r}: use one of "
                       f"{sorted(TIME_ACTIVATIONS)}")
    width = self.width
    foreign_in = (KEEP, EMBED)  # a projection from another model's width
    self.text_encodings_in = dense(width, self.dtype, foreign_in, (EMBED,),
                                    "text_encodings_in")
    self.text_embedding_in = dense(width, self.dtype, foreign_in, (EMBED,),
                                    "text_embedding_in")
    self.image_embedding_in = dense(width, self.dtype, foreign_in, (EMBED,),
                                     "image_embedding_in")
    time_hidden = self.time_embed_dim or width
    self.time_fc_in = dense(time_hidden, self.dtype, (EMBED, MLP), (MLP,),
                             "time_fc_in")
    self.time_fc_out = dense(width, self.dtype, (MLP, EMBED), (EMBED,),
                              "time_fc_out")
    if self.text_embedding_norm:
      self.ln_text_embedding = layer_norm(self.dtype, "ln_text_embedding")
    if self.norm_in:
      self.ln_in = layer_norm(self.dtype, "ln_in")
    normal = nn.initializers.normal(0.02)
    # diffusers' prd_embedding: the token whose output is the prediction.
    self.query = self.param(
        "query", nn.with_logical_partitioning(normal, (EMBED,)), (width,))
    self.position_embedding = self.param(
        "position_embedding",
        nn.with_logical_partitioning(normal, (KEEP, EMBED)),
        (self.sequence_length, width))
    self.transformer = TransformerStack(
        width=width, depth=self.depth, num_heads=self.num_heads,
        mlp_ratio=4.0, dtype=self.dtype, remat_policy=self.remat_policy,
        scan_layers=self.scan_layers, causal=True)
    self.ln_final = layer_norm(self.dtype, "ln_final")
    self.out = dense(self.output_dim, self.dtype, (EMBED, KEEP), (KEEP,),
                      "out")
    # Per-dimension statistics of CLIP image embeddings (Karlo's
    # ViT-L-14_stats): the model works on (z - mean) / std.
    self.clip_mean = self.param(
        "clip_mean", nn.with_logical_partitioning(nn.initializers.zeros,
                                                  (KEEP,)),
        (self.output_dim,))
    self.clip_std = self.param(
        "clip_std", nn.with_logical_partitioning(nn.initializers.ones, (KEEP,)),
        (self.output_dim,))

  def _positioned(self, x: jnp.ndarray, start: int) -> jnp.ndarray:
    """Tokens [batch, n, width] at positions start.. with their embeddings
    (and `norm_in`, which diffusers applies per token after them)."""
    positions = self.position_embedding[start:start + x.shape[1]]
    x = x + positions.astype(x.dtype)[None]
    if self.norm_in:
      x = self.ln_in(x)
    return constrain_tokens(x.astype(self.dtype))

  def _caption_tokens(self, text_embedding: jnp.ndarray,
                      text_encodings: jnp.ndarray, text_mask: jnp.ndarray
                      ) -> tuple[jnp.ndarray, jnp.ndarray]:
    """The caption prefix [text encodings (L), text embedding] as tokens
    [batch, L + 1, width], and which of them are real keys, bool
    [batch, L + 1]. Under causal attention nothing after it changes them."""
    batch, length, _ = text_encodings.shape
    if length != self.context_length:
      raise ValueError(f"text_encodings have length {length}, the model "
                       f"expects context_length {self.context_length}")
    if self.text_embedding_norm:
      text_embedding = self.ln_text_embedding(text_embedding)
    x = jnp.concatenate([
        self.text_encodings_in(text_encodings.astype(self.dtype)),
        self.text_embedding_in(text_embedding.astype(self.dtype))[:, None],
    ], axis=1)
    key_valid = jnp.concatenate([text_mask.astype(jnp.bool_),
                                 jnp.ones((batch, 1), jnp.bool_)], axis=1)
    return self._positioned(x, 0), key_valid

  def _step_tokens(self, x_t: jnp.ndarray, t: jnp.ndarray) -> jnp.ndarray:
    """[timestep, noised embedding, prd token] as tokens [batch, 3, width]:
    all that changes between sampling steps."""
    batch = x_t.shape[0]
    time = timestep_embedding(t, self.width).astype(self.dtype)
    activation = TIME_ACTIVATIONS[self.time_activation]
    time = self.time_fc_out(activation(self.time_fc_in(time)))
    query = jnp.broadcast_to(self.query.astype(self.dtype), (batch, self.width))
    x = jnp.stack([time.astype(self.dtype),
                   self.image_embedding_in(x_t.astype(self.dtype)), query],
                  axis=1)
    return self._positioned(x, self.context_length + 1)

  def _predict(self, states: jnp.ndarray) -> jnp.ndarray:
    """Stack output [batch, tokens, width], prd token last -> [batch,
    output_dim] float32."""
    query_state = self.ln_final(states[:, -1])
    return self.out(query_state.astype(self.dtype)).astype(jnp.float32)

  def __call__(self, x_t: jnp.ndarray, t: jnp.ndarray,
               text_embedding: jnp.ndarray, text_encodings: jnp.ndarray,
               text_mask: jnp.ndarray) -> jnp.ndarray:
    """The prediction at the prd token (Karlo: the clean embedding).

    Args:
      x_t: float [B, embedding_dim], the noised standardised embedding.
      t: int32 [B] timesteps.
      text_embedding: float [B, text_embedding_dim], CLIP's projected pooled
        text output, not L2-normalised (diffusers' proj_embedding).
      text_encodings: float [B, context_length, embedding_dim], CLIP's
        last_hidden_state (diffusers' encoder_hidden_states).
      text_mask: bool [B, context_length], True at real tokens.

    Returns:
      float32 [B, output_dim] (diffusers' predicted_image_embedding).
    """
    caption, caption_valid = self._caption_tokens(
        text_embedding, text_encodings, text_mask)
    steps = self._step_tokens(x_t, t)
    x = constrain_tokens(jnp.concatenate([caption, steps], axis=1))
    key_valid = jnp.concatenate(
        [caption_valid, jnp.ones(steps.shape[:2], jnp.bool_)], axis=1)
    return self._predict(self.transformer(x, key_valid))

  def encode_prefix(self, text_embedding: jnp.ndarray,
                    text_encodings: jnp.ndarray,
                    text_mask: jnp.ndarray) -> PrefixCache:
    """The caption's part of the forward pass (arguments as `__call__`'s):
    every layer's keys and values of [text encodings, text embedding], for
    `predict_from_prefix`, once per caption instead of once per step."""
    caption, caption_valid = self._caption_tokens(
        text_embedding, text_encodings, text_mask)
    _, (keys, values) = self.transformer(caption, caption_valid,
                                         return_key_values=True)
    return PrefixCache(keys=keys, values=values, key_valid=caption_valid)

  def predict_from_prefix(self, x_t: jnp.ndarray, t: jnp.ndarray,
                          prefix: PrefixCache) -> jnp.ndarray:
    """`__call__`'s prediction [B, output_dim] float32 from the caption's
    `encode_prefix` (same rows): only the 3 step tokens run."""
    steps = self._step_tokens(x_t, t)
    key_valid = jnp.concatenate(
        [prefix.key_valid, jnp.ones(steps.shape[:2], jnp.bool_)], axis=1)
    return self._predict(self.transformer(
        steps, key_valid, prefix_key_values=(prefix.keys, prefix.values)))

  def unnormalize(self, x: jnp.ndarray) -> jnp.ndarray:
    """Standardised [B, output_dim] -> CLIP image embedding space, float32
    (diffusers' post_process_latents)."""
    return x.astype(jnp.float32) * self.clip_std + self.clip_mean

  def normalize(self, image_embedding: jnp.ndarray) -> jnp.ndarray:
    """CLIP image embedding [B, output_dim] -> the model's standardised
    space, float32 (the inverse of `unnormalize`)."""
    centred = image_embedding.astype(jnp.float32) - self.clip_mean
    return centred / self.clip_std
