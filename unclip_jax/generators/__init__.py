"""The generative models of the chain, as peers: `Prior`, `Decoder`, `Upsampler`.

Each is built by `from_config(config, clip_sizes)` and offers `init_params`,
`losses`, `sample` and `abstract_batch` (base.py); the decoder also `invert`s.
`load(workdir, stage)` reads any of them back from a trained workdir, with the
Analytic-DPM moments its training run wrote at the last step (eps_moments.json).
"""
import importlib
from typing import Any

from unclip_jax.checkpoints.workdir import StageWorkdir
from unclip_jax.errors import ConfigError
from unclip_jax.generators.base import (ClipSizes, EpsMoments, Generator,
                                        Trained, abstract_params)

_GENERATORS = {
    "prior": "unclip_jax.generators.prior:Prior",
    "decoder": "unclip_jax.generators.decoder:Decoder",
    "upsampler": "unclip_jax.generators.upsampler:Upsampler",
}
# Stages whose generator reads a CLIP (and whose workdir has frozen_clip.json).
READS_CLIP = ("prior", "decoder")


def generator_class(stage: str, config: Any = None) -> type[Generator]:
  """The generator of `stage`; of a converted Karlo stage when `config` says
  model.arch = "karlo" (generators/karlo.py)."""
  if stage not in _GENERATORS:
    raise ConfigError(f"stage={stage!r} has no generator; use one of "
                      f"{sorted(_GENERATORS)}")
  if config is not None and config.get("model", {}).get("arch") == "karlo":
    from unclip_jax.generators import karlo  # pylint: disable=import-outside-toplevel
    return karlo.GENERATORS[stage]
  module, name = _GENERATORS[stage].split(":")
  return getattr(importlib.import_module(module), name)


def load(workdir: str | StageWorkdir, stage: str, step: int | None = None,
         sharding: Any = None) -> Trained:
  """A trained `stage` generator from its workdir alone: config, generator, EMA
  params (of the newest checkpoint that reads, or `step`), the CLIP sizes and
  fingerprint it was trained with, and the eps moments (`generator.eps_moments`, for
  sampler='analytic') when the run wrote them.

  The params are restored onto `sharding` (one Sharding, a pytree of them, or
  None: replicated on this host's devices), whatever mesh they were trained on.
  One-line WorkdirError for a missing, empty, wrong-stage or outdated workdir,
  or one whose every checkpoint is damaged.
  """
  if not isinstance(workdir, StageWorkdir):
    with StageWorkdir(workdir, stage) as reader:
      return load(reader, stage, step, sharding)
  reader = workdir
  newest = step is None
  step = reader.step(step)  # a missing checkpoint fails before anything is built
  clip_sizes, fingerprint = None, None
  if stage in READS_CLIP:
    record = reader.frozen_clip()
    clip_sizes, fingerprint = ClipSizes.from_record(record), record["fingerprint"]
  generator = generator_class(stage, reader.config).from_config(reader.config,
                                                           clip_sizes)
  expected = abstract_params(generator.init_params)
  if newest:  # a damaged newest checkpoint gives way to an older one (logged)
    step, params = reader.restore_newest_ema_params(sharding, expected=expected)
  else:
    params = reader.restore_ema_params(step, sharding, expected=expected)
  # Estimated with the final step's params; an earlier `step` uses them too.
  generator.eps_moments = EpsMoments.read(reader.path)
  return Trained(config=reader.config, generator=generator, params=params,
                 step=step, workdir=reader.path, clip_sizes=clip_sizes,
                 clip_fingerprint=fingerprint, eps_moments=generator.eps_moments)


__all__ = ["ClipSizes", "EpsMoments", "Generator", "READS_CLIP", "Trained",
           "generator_class", "load"]
