"""The stages of the unCLIP stack, by the name configs use (`config.stage`)."""
import importlib

from unclip_jax.errors import ConfigError

_STAGES = {
    "clip": "unclip_jax.stages.clip:ClipStage",
    "prior": "unclip_jax.stages.prior:PriorStage",
    "decoder": "unclip_jax.stages.decoder:DecoderStage",
    "upsampler": "unclip_jax.stages.upsampler:UpsamplerStage",
}


def get_stage(name: str):
  if name not in _STAGES:
    raise ConfigError(f"stage={name!r} is not one of {sorted(_STAGES)}; "
                      "check the config file")
  module, cls = _STAGES[name].split(":")
  return getattr(importlib.import_module(module), cls)
