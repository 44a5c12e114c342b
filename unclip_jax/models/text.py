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


def first_token_index(tokens: jnp.ndarray, token_id: int) -> jnp.ndarray:
  """[batch] index of the first `token_id` in `tokens` [batch, length]; 0 for a
  row without one. Pooling where a tokenizer pads with its end token (HF's
  CLIPTextModel with a current `eos_token_id`)."""
  return jnp.argmax(tokens == token_id, axis=-1).astype(jnp.int32)


# How the pooled state is found, by TextTransformer.pooling:
#   "last_non_pad": the last token that is not pad_id (our tokenizer's end token);
#   "first_end": the first end_id (HF CLIPTextModel whose eos_token_id is not 2);
#   "argmax": the largest token id (OpenAI's CLIP, HF with eos_token_id 2: CLIP's
#     end token is the last id of its vocabulary).
POOLINGS = ("last_non_pad", "first_end", "argmax")


def pooling_index(tokens: jnp.ndarray, pooling: str, pad_id: int,
                  end_id: int) -> jnp.ndarray:
  """[batch] position pooled in `tokens` [batch, length] (see POOLINGS)."""
  if pooling == "last_non_pad":
    return end_token_index(tokens, pad_id)
  if pooling == "first_end":
    return first_token_index(tokens, end_id)
  if pooling == "argmax":
    return jnp.argmax(tokens, axis=-1).astype(jnp.int32)
  raise ValueError(f"text pooling {pooling!r} is none of {POOLINGS}")


class TextTransformer(nn.Module):
  """Token + learned position embeddings, causal stack with key padding,
  final LayerNorm, pooled at the end token and projected to `output_dim`.

  Options for converted checkpoints (defaults: our own CLIP): `pooling` (one of
  POOLINGS) with `end_id`; `key_padding_mask=False` runs the stack causal only,
  as OpenAI's and HF's text towers do (pad tokens are then read as tokens, and
  the states up to the pooled one do not depend on them); `activation` and
  `layer_norm_eps` are TransformerStack's.
  """
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
  pooling: str = "last_non_pad"
  end_id: int = 2
  key_padding_mask: bool = True
  activation: str = "gelu"
  layer_norm_eps: float = 1e-5

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

    padding = tokens != self.pad_id if self.key_padding_mask else None
    x = TransformerStack(
        width=self.width, depth=self.depth, num_heads=self.num_heads,
        mlp_ratio=self.mlp_ratio, dropout=self.dropout, dtype=self.dtype,
        remat_policy=self.remat_policy, scan_layers=self.scan_layers,
        causal=True, activation=self.activation,
        layer_norm_eps=self.layer_norm_eps,
        name="transformer")(x, padding, deterministic)
    token_encodings = layer_norm(self.dtype, "ln_final", self.layer_norm_eps)(x)

    end = pooling_index(tokens, self.pooling, self.pad_id, self.end_id)
    pooled = jnp.take_along_axis(token_encodings, end[:, None, None],
                                 axis=1)[:, 0]
    projected = nn.Dense(
        self.output_dim, use_bias=False, dtype=self.dtype, name="projection",
        dot_general=dot_general_f32_accumulate,
        kernel_init=nn.with_logical_partitioning(dense_init, (EMBED, KEEP)),
    )(pooled)
    return (projected.astype(jnp.float32),
            token_encodings.astype(jnp.float32))
