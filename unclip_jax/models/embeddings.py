"""Sinusoidal embeddings of diffusion timesteps."""
import math

import jax.numpy as jnp


def timestep_embedding(timesteps: jnp.ndarray, dim: int,
                       max_period: float = 10000.0) -> jnp.ndarray:
  """Sinusoidal embedding of (possibly fractional) timesteps.

  Args:
    timesteps: [batch] integer or float timesteps.
    dim: width of the embedding.
    max_period: the slowest frequency's period.

  Returns:
    [batch, dim] float32: cos features then sin features (zero-padded when
    `dim` is odd), as in ADM / GLIDE.
  """
  half = dim // 2
  frequencies = jnp.exp(-math.log(max_period)
                        * jnp.arange(half, dtype=jnp.float32) / half)
  angles = timesteps.astype(jnp.float32)[:, None] * frequencies[None, :]
  embedding = jnp.concatenate([jnp.cos(angles), jnp.sin(angles)], axis=-1)
  if dim % 2:
    embedding = jnp.pad(embedding, ((0, 0), (0, 1)))
  return embedding
