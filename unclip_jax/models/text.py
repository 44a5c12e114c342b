"""The CLIP text tower: a causal transformer pooled at the end token."""
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from unclip_jax.models.transformer import (TransformerStack, constrain_tokens,
                                           dense_init, layer_norm)
from unclip_jax.models.precision import dot_general_f32_accumulate
from unclip_jax.parallel.axes import EMBED, KEEP, VOCAB

Dtype = Any


def end_token_index(tokens: jnp.ndarray, pad_id: int) -> jnp.ndarray:
  """[batch] index of the last non-pad token (the tokenizer's end token) of
  right-padded `tokens` [batch, length]; 0 for an all-pad row."""
  positions = jnp.arange(tokens.shape[-1], dtype=jnp.int32)
  return jnp.max(jnp.where(tokens != pad_id, positions, 0), axis=-1)


class TextTransformer(nn.Module):
  """Token + learned position embeddings, causal stack with key padding,
  final LayerNorm, pooled at the end token and projected to `output_dim`."""
  vocab_size: int
  context_length: int
  width: int
  depth: int
  num_heads: int
  output_dim: int
  mlp_ratio: float = 4.0
  pad_id: int = 0
  dropout: float = 0.0
  dtype: Dtype = jnp.float32
  remat_policy: str = "none"
  scan_layers: bool = True

  @nn.compact
  def __call__(self, tokens: jnp.ndarray, deterministic: bool = True
               ) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Encodes right-padded token ids.

    Args:
      tokens: int32 [batch, context_length], padded on the right with pad_id.
      deterministic: disables dropout.

    Returns:
      pooled: [batch, output_dim] float32, the projected end-token state (not
        normalised).
      token_encodings: [batch, context_length, width] float32, the per-token
        states after ln_final (what the prior and decoder consume).
    """
    length = tokens.shape[1]
    if length != self.context_length:
      raise ValueError(f"tokens have length {length}, the model expects "
                       f"context_length {self.context_length}")
    x = nn.Embed(
        self.vocab_size, self.width, dtype=self.dtype, name="token_embedding",
        embedding_init=nn.with_logical_partitioning(
            nn.initializers.normal(0.02), (VOCAB, EMBED)))(tokens)
    positions = self.param(
        "position_embedding",
        nn.with_logical_partitioning(nn.initializers.normal(0.01),
                                     (KEEP, EMBED)),
        (self.context_length, self.width))
    x = constrain_tokens(x + positions.astype(x.dtype)[None])

    x = TransformerStack(
        width=self.width, depth=self.depth, num_heads=self.num_heads,
        mlp_ratio=self.mlp_ratio, dropout=self.dropout, dtype=self.dtype,
        remat_policy=self.remat_policy, scan_layers=self.scan_layers,
        causal=True, name="transformer")(x, tokens != self.pad_id,
                                         deterministic)
    token_encodings = layer_norm(self.dtype, "ln_final")(x)

    end = end_token_index(tokens, self.pad_id)
    pooled = jnp.take_along_axis(token_encodings, end[:, None, None],
                                 axis=1)[:, 0]
    projected = nn.Dense(
        self.output_dim, use_bias=False, dtype=self.dtype, name="projection",
        dot_general=dot_general_f32_accumulate,
        kernel_init=nn.with_logical_partitioning(dense_init, (EMBED, KEEP)),
    )(pooled)
    return (projected.astype(jnp.float32),
            token_encodings.astype(jnp.float32))
