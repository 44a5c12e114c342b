"""Sampling options: the caller's value or the stage config's `sample.*`
default, checked with one-line errors before anything compiles."""
import numbers
from typing import Any, Sequence

import ml_collections

from unclip_jax.errors import UserError


def _whole(value: Any) -> bool:
  return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def count(name: str, value: Any) -> int:
  """A whole number >= 1 (num_images, num_steps of a strip, ...)."""
  if not _whole(value) or value < 1:
    raise UserError(f"{name} must be a whole number >= 1, got {value!r}")
  return int(value)


def _steps(name: str, value: int | None, config: ml_collections.ConfigDict) -> int:
  value = config.sample.num_steps if value is None else value
  total = config.diffusion.num_timesteps
  if not _whole(value) or not 1 <= value <= total:
    raise UserError(f"{name}={value!r}: must be a whole number in [1, {total}] "
                    "(the stage's diffusion steps)")
  return int(value)


def _number(name: str, value: Any, default: Any, minimum: float | None = None
            ) -> float:
  value = default if value is None else value
  try:
    value = float(value)
  except (TypeError, ValueError):
    raise UserError(f"{name} must be a number, got {value!r}") from None
  if minimum is not None and value < minimum:
    raise UserError(f"{name}={value:g} must be >= {minimum:g}")
  return value


def prior_options(config: ml_collections.ConfigDict, *, steps=None, guidance=None,
                  candidates=None, eta=None) -> dict:
  """Keyword arguments of DiffusionPrior.sample."""
  s = config.sample
  return {"num_steps": _steps("prior_steps", steps, config),
          "guidance_scale": _number("prior_guidance", guidance, s.guidance_scale),
          "num_candidates": count("prior_candidates",
                                  s.num_candidates if candidates is None
                                  else candidates),
          "eta": _number("prior_eta", eta, s.eta, minimum=0.0)}


def decoder_options(config: ml_collections.ConfigDict, *, steps=None, guidance=None,
                    eta=None, clip_denoised=None) -> dict:
  """Static keyword arguments of the decoder's compiled sampler."""
  s = config.sample
  return {"num_steps": _steps("decoder_steps", steps, config),
          "guidance_scale": _number("decoder_guidance", guidance, s.guidance_scale),
          "eta": _number("decoder_eta", eta, s.eta, minimum=0.0),
          "clip_denoised": bool(s.clip_denoised if clip_denoised is None
                                else clip_denoised)}


def upsampler_steps(configs: Sequence[ml_collections.ConfigDict],
                    steps: int | Sequence[int] | None) -> list[int]:
  """One step count per upsampler: from `steps` (one for all, or one each) or
  each config's default."""
  if steps is None or _whole(steps):
    steps = [steps] * len(configs)
  steps = list(steps)
  if len(steps) != len(configs):
    raise UserError(f"upsampler_steps has {len(steps)} values for "
                    f"{len(configs)} upsamplers; give one per upsampler")
  return [_steps(f"upsampler_steps[{i}]", value, config)
          for i, (value, config) in enumerate(zip(steps, configs))]
