"""Sampling from trained stages: `UnCLIPPipeline` (text-to-image and the image
manipulations) and what it returns. See docs/sampling.md."""
from unclip_jax.pipeline.chain import UnCLIPPipeline
from unclip_jax.pipeline.compat import IncompatibleStagesError
from unclip_jax.pipeline.manipulations import slerp
from unclip_jax.pipeline.results import Samples

__all__ = ["IncompatibleStagesError", "Samples", "UnCLIPPipeline", "slerp"]
