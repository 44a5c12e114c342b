"""Karlo's text projection: CLIP embeddings -> the decoder's conditioning.

diffusers' UnCLIPTextProjModel, with classifier-free guidance's null image
embedding chosen per row (`drop_image_embedding`) instead of by prepending a
batch of null rows. It makes the two inputs of Karlo's decoder UNet:
  - additive time embeddings: image and prompt embeddings projected to the
    UNet's time-embedding width (its `class_labels`);
  - context tokens: the image embedding projected to `extra_context_tokens`
    tokens, followed by the CLIP text encoder's last hidden states, projected
    and layer-normed (the UNet's `encoder_hidden_states`; its attention mask is
    the text mask with True prepended for the extra tokens).
"""
import flax.linen as nn
import jax
import jax.numpy as jnp

from unclip_jax.models import precision
from unclip_jax.models.attention import fan_in_init, param
from unclip_jax.models.transformer import layer_norm
from unclip_jax.models.unet_blocks import Dense, Dtype
from unclip_jax.parallel.axes import EMBED, MLP


class KarloTextProj(nn.Module):
  """CLIP image / prompt embeddings and text hidden states -> (context tokens,
  additive time embeddings). Params: null_image_embedding, prompt_to_time,
  image_to_time, image_tokens_kernel [clip, extra, cross], image_tokens_bias,
  text_proj, text_norm."""
  extra_context_tokens: int = 4
  clip_embedding_dim: int = 768
  time_embed_dim: int = 1280
  cross_attention_dim: int = 1536
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, image_embeddings: jax.Array, prompt_embeds: jax.Array,
               text_encoder_hidden_states: jax.Array,
               drop_image_embedding: jax.Array | None = None
               ) -> tuple[jax.Array, jax.Array]:
    """Args:
      image_embeddings: float [batch, clip_embedding_dim] (the prior's output).
      prompt_embeds: float [batch, clip_embedding_dim] (CLIP text embeds).
      text_encoder_hidden_states: float [batch, length, clip_embedding_dim].
      drop_image_embedding: bool [batch]; True rows use the learned null image
        embedding (classifier-free guidance's unconditional rows).
    Returns:
      (encoder_hidden_states [batch, extra + length, cross_attention_dim],
       additive time embeddings [batch, time_embed_dim]), both in `dtype`.
    """
    batch = image_embeddings.shape[0]
    for name, value in (("prompt_embeds", prompt_embeds),
                        ("text_encoder_hidden_states", text_encoder_hidden_states)):
      if value.shape[0] != batch:
        raise ValueError(f"{name} has {value.shape[0]} rows, image_embeddings "
                         f"{batch}")
    null = param(self, "null_image_embedding", nn.initializers.zeros,
                 (self.clip_embedding_dim,), (EMBED,))
    if drop_image_embedding is not None:
      image_embeddings = jnp.where(drop_image_embedding[:, None], null[None],
                                   image_embeddings)
    image_embeddings = image_embeddings.astype(self.dtype)

    time_emb = (Dense(self.time_embed_dim, (EMBED, MLP), self.dtype,
                      name="prompt_to_time")(prompt_embeds.astype(self.dtype))
                + Dense(self.time_embed_dim, (EMBED, MLP), self.dtype,
                        name="image_to_time")(image_embeddings))

    kernel = param(self, "image_tokens_kernel", fan_in_init([0]),
                   (self.clip_embedding_dim, self.extra_context_tokens,
                    self.cross_attention_dim), (EMBED, None, MLP))
    bias = param(self, "image_tokens_bias", nn.initializers.zeros,
                 (self.extra_context_tokens, self.cross_attention_dim), (None, MLP))
    image_tokens = (precision.einsum("bd,dtw->btw", image_embeddings,
                                     kernel.astype(self.dtype))
                    + bias).astype(self.dtype)

    text = Dense(self.cross_attention_dim, (EMBED, MLP), self.dtype,
                 name="text_proj")(text_encoder_hidden_states.astype(self.dtype))
    text = layer_norm(self.dtype, "text_norm")(text)
    context = jnp.concatenate([image_tokens, text], axis=1)
    return context, time_emb.astype(self.dtype)
