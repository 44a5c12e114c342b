"""The DALL-E 2 diffusion prior: a causal transformer that predicts the CLIP
image embedding z_i from a noised z_i, the timestep and the caption."""
from typing import Any

import flax
import flax.linen as nn
import jax.numpy as jnp

from unclip_jax.models.embeddings import timestep_embedding
from unclip_jax.models.transformer import (TransformerStack, constrain_tokens,
                                           dense_init, layer_norm)
from unclip_jax.models.precision import dot_general_f32_accumulate
from unclip_jax.parallel.axes import EMBED, KEEP, MLP

Dtype = Any

# Tokens after the caption: z_t, timestep, noised z_i, query.
NUM_EXTRA_TOKENS = 4


@flax.struct.dataclass
class PrefixCache:
  """What the prior computes from a caption alone: every layer's keys and
  values of the prefix [text encodings (L), z_t], each
  [depth, batch, L + 1, heads, head_dim], and which prefix keys are real
  (bool [batch, L + 1]; padding is hidden from the later tokens)."""
  keys: jnp.ndarray
  values: jnp.ndarray
  key_valid: jnp.ndarray


def dense(features: int, dtype: Dtype, kernel_axes: tuple, bias_axes: tuple,
          name: str) -> nn.Dense:
  """A Dense layer with f32 accumulation and logical axes on kernel and bias."""
  return nn.Dense(
      features, dtype=dtype, name=name,
      dot_general=dot_general_f32_accumulate,
      kernel_init=nn.with_logical_partitioning(dense_init, kernel_axes),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros, bias_axes))


class PriorTransformer(nn.Module):
  """Decoder-only causal transformer over

      [text encodings (L), z_t, timestep embedding, noised z_i, query]

  (L + 4 tokens, learned positions), read out at the query token and projected
  to the embedding width. The paper's prior is width 2048, depth 24, 32 heads
  on CLIP embed_dim 1024, about 1B parameters.

  Classifier-free guidance: where `drop_text` is True the caption is replaced,
  inside the module, by a learned null sequence `null_text_encodings` (every
  position valid) and a learned `null_text_embedding`, so one compiled
  function serves conditional and unconditional rows.

  Sampling: under causal attention the caption prefix [text encodings, z_t]
  never sees the timestep or z_i, so a sampler runs `encode_prefix` once (every
  layer's keys and values of the prefix) and `predict_from_prefix` per step
  (the 3 later tokens only); training runs `__call__` on the whole sequence.
  """
  embed_dim: int
  text_width: int
  width: int
  depth: int
  num_heads: int
  context_length: int
  mlp_ratio: float = 4.0
  dropout: float = 0.0
  dtype: Dtype = jnp.float32
  remat_policy: str = "none"
  scan_layers: bool = True

  @property
  def sequence_length(self) -> int:
    return self.context_length + NUM_EXTRA_TOKENS

  def setup(self):
    foreign_in = (KEEP, EMBED)  # a projection from another model's width
    self.text_encodings_in = dense(self.width, self.dtype, foreign_in,
                                    (EMBED,), "text_encodings_in")
    self.text_embedding_in = dense(self.width, self.dtype, foreign_in,
                                    (EMBED,), "text_embedding_in")
    self.image_embedding_in = dense(self.width, self.dtype, foreign_in,
                                     (EMBED,), "image_embedding_in")
    self.time_fc_in = dense(self.width, self.dtype, (EMBED, MLP), (MLP,),
                             "time_fc_in")
    self.time_fc_out = dense(self.width, self.dtype, (MLP, EMBED), (EMBED,),
                              "time_fc_out")
    normal = nn.initializers.normal(0.02)
    self.query = self.param(
        "query", nn.with_logical_partitioning(normal, (EMBED,)), (self.width,))
    self.position_embedding = self.param(
        "position_embedding",
        nn.with_logical_partitioning(normal, (KEEP, EMBED)),
        (self.sequence_length, self.width))
    self.null_text_encodings = self.param(
        "null_text_encodings",
        nn.with_logical_partitioning(normal, (KEEP, EMBED)),
        (self.context_length, self.text_width))
    self.null_text_embedding = self.param(
        "null_text_embedding",
        nn.with_logical_partitioning(normal, (EMBED,)), (self.embed_dim,))
    self.transformer = TransformerStack(
        width=self.width, depth=self.depth, num_heads=self.num_heads,
        mlp_ratio=self.mlp_ratio, dropout=self.dropout, dtype=self.dtype,
        remat_policy=self.remat_policy, scan_layers=self.scan_layers,
        causal=True)
    self.ln_final = layer_norm(self.dtype, "ln_final")
    self.out = dense(self.embed_dim, self.dtype, (EMBED, KEEP), (KEEP,),
                      "out")

  def _caption_tokens(self, text_embedding: jnp.ndarray,
                      text_encodings: jnp.ndarray, text_mask: jnp.ndarray,
                      drop_text: jnp.ndarray
                      ) -> tuple[jnp.ndarray, jnp.ndarray]:
    """The caption prefix [text encodings (L), z_t] with its positions,
    [batch, L + 1, width], and which of its keys are real, bool [batch, L + 1].
    Under causal attention nothing after it changes its states."""
    batch, length, _ = text_encodings.shape
    if length != self.context_length:
      raise ValueError(f"text_encodings have length {length}, the model "
                       f"expects context_length {self.context_length}")
    drop = drop_text.astype(jnp.bool_)
    text_encodings = jnp.where(drop[:, None, None],
                               self.null_text_encodings[None],
                               text_encodings.astype(jnp.float32))
    text_embedding = jnp.where(drop[:, None], self.null_text_embedding[None],
                               text_embedding.astype(jnp.float32))
    # The null sequence has no padding; z_t is never masked.
    key_valid = jnp.concatenate([
        jnp.where(drop[:, None], True, text_mask.astype(jnp.bool_)),
        jnp.ones((batch, 1), jnp.bool_)], axis=1)
    x = jnp.concatenate([
        self.text_encodings_in(text_encodings.astype(self.dtype)),
        self.text_embedding_in(text_embedding.astype(self.dtype))[:, None],
    ], axis=1)
    positions = self.position_embedding[:self.context_length + 1]
    return constrain_tokens(x + positions.astype(x.dtype)[None]), key_valid

  def _step_tokens(self, noised_image_embedding: jnp.ndarray,
                   timesteps: jnp.ndarray) -> jnp.ndarray:
    """The tokens after the caption [timestep, noised z_i, query] with their
    positions, [batch, 3, width]: all that changes between sampling steps."""
    batch = noised_image_embedding.shape[0]
    time = timestep_embedding(timesteps, self.width).astype(self.dtype)
    time = self.time_fc_out(nn.silu(self.time_fc_in(time)))
    query = jnp.broadcast_to(self.query.astype(self.dtype),
                             (batch, self.width))
    x = jnp.stack([
        time,
        self.image_embedding_in(noised_image_embedding.astype(self.dtype)),
        query,
    ], axis=1)
    positions = self.position_embedding[self.context_length + 1:]
    return constrain_tokens(x + positions.astype(x.dtype)[None])

  def _predict_from_states(self, states: jnp.ndarray) -> jnp.ndarray:
    """Transformer output [batch, tokens, width], query token last -> the
    predicted z_i [batch, embed_dim] float32."""
    query_state = self.ln_final(states[:, -1]).astype(jnp.float32)
    return self.out(query_state.astype(self.dtype)).astype(jnp.float32)

  def _transformer_states(self, noised_image_embedding, timesteps,
                          text_embedding, text_encodings, text_mask, drop_text,
                          deterministic):
    """The whole sequence through the stack: [batch, L + 4, width]."""
    caption, caption_valid = self._caption_tokens(
        text_embedding, text_encodings, text_mask, drop_text)
    steps = self._step_tokens(noised_image_embedding, timesteps)
    x = constrain_tokens(jnp.concatenate([caption, steps], axis=1))
    # The tokens after the caption are never masked as keys.
    key_valid = jnp.concatenate(
        [caption_valid, jnp.ones(steps.shape[:2], jnp.bool_)], axis=1)
    return self.transformer(x, key_valid, deterministic)

  def hidden_states(self, noised_image_embedding: jnp.ndarray,
                    timesteps: jnp.ndarray, text_embedding: jnp.ndarray,
                    text_encodings: jnp.ndarray, text_mask: jnp.ndarray,
                    drop_text: jnp.ndarray,
                    deterministic: bool = True) -> jnp.ndarray:
    """The final-LayerNorm states of every token, [batch, L + 4, width]
    float32 (same arguments as `__call__`)."""
    return self.ln_final(self._transformer_states(
        noised_image_embedding, timesteps, text_embedding, text_encodings,
        text_mask, drop_text, deterministic)).astype(jnp.float32)

  def __call__(self, noised_image_embedding: jnp.ndarray,
               timesteps: jnp.ndarray, text_embedding: jnp.ndarray,
               text_encodings: jnp.ndarray, text_mask: jnp.ndarray,
               drop_text: jnp.ndarray,
               deterministic: bool = True) -> jnp.ndarray:
    """Predicts the clean image embedding.

    Args:
      noised_image_embedding: [batch, embed_dim], z_i noised to `timesteps`.
      timesteps: int32 [batch].
      text_embedding: [batch, embed_dim], CLIP z_t.
      text_encodings: [batch, context_length, text_width], CLIP's per-token
        text states.
      text_mask: bool [batch, context_length], True at real (non-pad) tokens.
      drop_text: bool [batch], True where the caption is replaced by the
        learned null caption (classifier-free guidance).
      deterministic: disables dropout.

    Returns:
      [batch, embed_dim] float32, the predicted z_i (x0 prediction).
    """
    return self._predict_from_states(self._transformer_states(
        noised_image_embedding, timesteps, text_embedding, text_encodings,
        text_mask, drop_text, deterministic))

  def encode_prefix(self, text_embedding: jnp.ndarray,
                    text_encodings: jnp.ndarray, text_mask: jnp.ndarray,
                    drop_text: jnp.ndarray) -> PrefixCache:
    """The caption's part of the forward pass, for `predict_from_prefix`:
    every layer's keys and values of [text encodings, z_t] (arguments as
    `__call__`'s; no dropout). A sampler computes it once, not once per step."""
    caption, caption_valid = self._caption_tokens(
        text_embedding, text_encodings, text_mask, drop_text)
    _, (keys, values) = self.transformer(caption, caption_valid,
                                         return_key_values=True)
    return PrefixCache(keys=keys, values=values, key_valid=caption_valid)

  def predict_from_prefix(self, noised_image_embedding: jnp.ndarray,
                          timesteps: jnp.ndarray,
                          prefix: PrefixCache) -> jnp.ndarray:
    """`__call__`'s prediction [batch, embed_dim] float32 from the caption's
    `encode_prefix` (same rows): runs only the 3 tokens after the caption, which
    attend to the cached keys and values and, causally, to each other."""
    steps = self._step_tokens(noised_image_embedding, timesteps)
    key_valid = jnp.concatenate(
        [prefix.key_valid, jnp.ones(steps.shape[:2], jnp.bool_)], axis=1)
    return self._predict_from_states(self.transformer(
        steps, key_valid, prefix_key_values=(prefix.keys, prefix.values)))
