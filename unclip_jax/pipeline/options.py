"""Sampling options: the caller's value or the stage config's `sample.*`
default, checked with one-line errors before anything compiles.

The pipeline's per-stage options are named `<stage>_<option>`; the functions
below take the option part (`steps`, `sampler`, ...) and return the keyword
arguments of that stage's `generator.sample`.
"""
import numbers
from typing import Any, Mapping, Sequence

import ml_collections

from unclip_jax import diffusion
from unclip_jax.errors import UserError
from unclip_jax.generators import common

PRIOR = ("prior_sampler", "prior_steps", "prior_guidance", "prior_candidates",
         "prior_eta", "prior_variance")
DECODER = ("decoder_sampler", "decoder_steps", "decoder_guidance", "decoder_eta",
           "decoder_variance", "decoder_threshold")
# Each takes one value for every upsampler or a list of one per upsampler.
UPSAMPLER = ("upsampler_sampler", "upsampler_steps", "upsampler_eta",
             "upsampler_variance", "upsampler_threshold")
# What the manipulations fix themselves: DDIM, at their own eta.
DECODER_SAMPLER = ("decoder_sampler", "decoder_eta", "decoder_variance")


def check_names(what: str, given: Mapping[str, Any], allowed: Sequence[str],
                fixed: Sequence[str] = ()) -> dict:
  """UserError for an option `what` does not take (a typo), or one it fixes
  itself (`fixed`) given a value; returns the options without `fixed`."""
  for name, value in given.items():
    if name in fixed and value is not None:
      raise UserError(f"{what} decodes with DDIM at its own eta, so it takes no "
                      f"{name}; drop it")
    if name not in allowed:
      raise UserError(f"{what} has no option {name!r}; use one of "
                      f"{', '.join(n for n in allowed if n not in fixed)}")
  return {k: v for k, v in given.items() if k not in fixed}


def of_stage(prefix: str, given: Mapping[str, Any]) -> dict:
  """{'decoder_steps': 5, ...} -> {'steps': 5} for the options of `prefix`."""
  return {name[len(prefix) + 1:]: value for name, value in given.items()
          if name.startswith(prefix + "_")}


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


def number(name: str, value: Any, default: Any = None,
           minimum: float | None = None) -> float:
  value = default if value is None else value
  try:
    value = float(value)
  except (TypeError, ValueError):
    raise UserError(f"{name} must be a number, got {value!r}") from None
  if minimum is not None and value < minimum:
    raise UserError(f"{name}={value:g} must be >= {minimum:g}")
  return value


def _sampler(stage: str, config: ml_collections.ConfigDict, *, sampler, eta,
             variance, learned_variance: bool, moments: bool | None) -> dict:
  """sampler, eta, variance of `generator.sample`, checked under the option
  names (`decoder_sampler=...`); moments: whether the stage's workdir has
  eps moments (None: not checked)."""
  s = config.sample
  chosen = s.get("sampler", "ddim") if sampler is None else sampler
  if chosen not in diffusion.SAMPLERS:
    raise UserError(f"{stage}_sampler={chosen!r}: use one of {diffusion.SAMPLERS}")
  eta = number(f"{stage}_eta", eta, s.get("eta", 0.0), minimum=0.0)
  choices = diffusion.DDPM_VARIANCES[:2] + ("learned",) * learned_variance
  if variance is not None and variance not in choices:
    raise UserError(f"{stage}_variance={variance!r}: this {stage} takes one of "
                    f"{choices}" + ("" if learned_variance else
                                    " (it was not trained with a learned variance)"))
  if chosen == "analytic" and moments is False:
    raise UserError(f"{stage}_sampler='analytic' needs the eps moments its "
                    f"training writes at the last step ({stage} workdir's "
                    "eps_moments.json): train it to config.total_steps, or "
                    f"choose {stage}_sampler 'ddim' or 'ddpm'")
  return common.sampler_options(config, sampler=chosen, variance=variance,
                                eta=eta, learned_variance=learned_variance)


def _threshold(name: str, value: Any, config: ml_collections.ConfigDict):
  value = config.sample.get("threshold_percentile") if value is None else value
  if value is None:
    return None
  value = number(name, value)
  if not 0 < value <= 100:
    raise UserError(f"{name}={value:g}: a percentile in (0, 100], e.g. 99.5")
  return value


def prior_options(config: ml_collections.ConfigDict, *, steps=None, guidance=None,
                  candidates=None, eta=None, sampler=None, variance=None,
                  moments: bool | None = None) -> dict:
  """Keyword arguments of Prior.sample (no thresholding: z_i has no range)."""
  s = config.sample
  return {"num_steps": _steps("prior_steps", steps, config),
          "guidance_scale": number("prior_guidance", guidance, s.guidance_scale),
          "num_candidates": count("prior_candidates",
                                  s.num_candidates if candidates is None
                                  else candidates),
          **_sampler("prior", config, sampler=sampler, eta=eta, variance=variance,
                     learned_variance=False, moments=moments)}


def decoder_options(config: ml_collections.ConfigDict, *, steps=None, guidance=None,
                    eta=None, clip_denoised=None, sampler=None, variance=None,
                    threshold=None, moments: bool | None = None) -> dict:
  """Static keyword arguments of the decoder's compiled sampler."""
  s = config.sample
  return {"num_steps": _steps("decoder_steps", steps, config),
          "guidance_scale": number("decoder_guidance", guidance, s.guidance_scale),
          "clip_denoised": bool(s.clip_denoised if clip_denoised is None
                                else clip_denoised),
          "threshold_percentile": _threshold("decoder_threshold", threshold,
                                             config),
          **_sampler("decoder", config, sampler=sampler, eta=eta,
                     variance=variance,
                     learned_variance=bool(config.model.learned_variance),
                     moments=moments)}


def _each(name: str, value: Any, total: int) -> list:
  """One value for every upsampler, or a list / tuple of one each."""
  if not isinstance(value, (list, tuple)):
    return [value] * total
  if len(value) != total:
    raise UserError(f"{name} has {len(value)} values for {total} upsamplers; "
                    "give one, or one per upsampler")
  return list(value)


def upsampler_options(configs: Sequence[ml_collections.ConfigDict], *,
                      steps=None, sampler=None, eta=None, variance=None,
                      threshold=None, moments: Sequence[bool] | None = None
                      ) -> list[dict]:
  """Keyword arguments of each upsampler's `sample`, lowest resolution first."""
  total = len(configs)
  columns = {k: _each(f"upsampler_{k}", v, total) for k, v in dict(
      steps=steps, sampler=sampler, eta=eta, variance=variance,
      threshold=threshold).items()}
  moments = [None] * total if moments is None else list(moments)
  out = []
  for i, config in enumerate(configs):
    name = f"upsampler_steps[{i}]" if total > 1 else "upsampler_steps"
    out.append({
        "num_steps": _steps(name, columns["steps"][i], config),
        "threshold_percentile": _threshold(
            "upsampler_threshold", columns["threshold"][i], config),
        **_sampler("upsampler", config, sampler=columns["sampler"][i],
                   eta=columns["eta"][i], variance=columns["variance"][i],
                   learned_variance=False, moments=moments[i])})
  return out


def upsampler_steps(configs: Sequence[ml_collections.ConfigDict],
                    steps: int | Sequence[int] | None) -> list[int]:
  """One step count per upsampler: from `steps` (one for all, or one each) or
  each config's default."""
  return [o["num_steps"] for o in upsampler_options(configs, steps=steps)]
