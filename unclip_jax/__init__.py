"""unclip-jax: DALL-E 2 (unCLIP) in JAX/Flax."""

__version__ = "0.1.0"


def __getattr__(name):
  # Lazy, so that `import unclip_jax` (and every CLI's --help) stays free of jax.
  if name == "UnCLIPPipeline":
    from unclip_jax.pipeline import UnCLIPPipeline  # pylint: disable=import-outside-toplevel
    return UnCLIPPipeline
  raise AttributeError(f"module 'unclip_jax' has no attribute {name!r}")
