"""unclip-jax: DALL-E 2 (unCLIP) in JAX/Flax."""

__version__ = "0.1.0"
