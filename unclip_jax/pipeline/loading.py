"""Loading a chain of trained stages from their workdirs: configs and checkpoint
steps first (cheap, one-line errors for a missing, empty or wrong-stage
workdir), then the compatibility checks, then the EMA params."""
import dataclasses
import os
import re
from typing import Any, Mapping, Sequence

from unclip_jax.errors import UserError
from unclip_jax.pipeline import compat
from unclip_jax.stages import frozen
from unclip_jax.stages.decoder import TrainedDecoder, load_decoder
from unclip_jax.stages.frozen import FrozenClip
from unclip_jax.stages.prior import TrainedPrior, load_prior
from unclip_jax.stages.upsampler import Upsampler, load_upsampler

Steps = int | Mapping[str, int] | None


@dataclasses.dataclass(frozen=True)
class TrainedUpsampler:
  config: Any
  upsampler: Upsampler
  params: Any  # EMA params
  step: int


@dataclasses.dataclass(frozen=True)
class LoadedStages:
  clip: FrozenClip
  prior: TrainedPrior | None
  decoder: TrainedDecoder
  upsamplers: tuple[TrainedUpsampler, ...]
  workdirs: dict[str, str]  # stage name -> workdir


def upsampler_names(count: int) -> list[str]:
  """The workdir names the demo uses: upsampler, upsampler2, ..."""
  return ["upsampler" if i == 0 else f"upsampler{i + 1}" for i in range(count)]


def _step_of(steps: Steps, name: str) -> int | None:
  if steps is None or isinstance(steps, int):
    return steps
  unknown = [n for n in steps if n not in ("clip", "prior", "decoder")
             and not re.fullmatch(r"upsampler\d*", n)]
  if unknown:
    raise UserError(f"step: unknown stages {sorted(unknown)}; use clip, prior, "
                    "decoder, upsampler, upsampler2, ...")
  return steps.get(name)


def _read_stage(workdir: str, stage: str, name: str, step: int | None,
                frozen_clip: bool) -> compat.StageInfo:
  if not isinstance(workdir, (str, os.PathLike)):
    raise UserError(f"the {name} workdir must be a path, got {workdir!r}")
  workdir = os.fspath(workdir)
  config = frozen.read_config(workdir, stage)
  frozen.latest_step(workdir, stage, step)
  info = None
  if frozen_clip:
    info = frozen.read_frozen_clip(workdir, stage)
  return compat.StageInfo(name, workdir, config, info)


def load_stages(clip: str, decoder: str, prior: str | None = None,
                upsamplers: Sequence[str] = (), step: Steps = None) -> LoadedStages:
  """Every stage's config, EMA params and checkpoint step, checked to fit."""
  if isinstance(upsamplers, (str, os.PathLike)):
    upsamplers = [upsamplers]
  names = upsampler_names(len(upsamplers))
  clip_stage = FrozenClip(clip, step=_step_of(step, "clip"))
  prior_info = None if prior is None else _read_stage(
      prior, "prior", "prior", _step_of(step, "prior"), True)
  decoder_info = _read_stage(decoder, "decoder", "decoder", _step_of(step, "decoder"),
                             True)
  upsampler_infos = [
      _read_stage(workdir, "upsampler",
                  f"upsampler {i + 1}" if len(names) > 1 else "upsampler",
                  _step_of(step, name), False)
      for i, (workdir, name) in enumerate(zip(upsamplers, names))]
  compat.check_chain(clip_stage, prior_info, decoder_info, upsampler_infos)

  loaded_upsamplers = []
  for info, name in zip(upsampler_infos, names):
    loaded_upsamplers.append(TrainedUpsampler(*load_upsampler(
        info.workdir, _step_of(step, name))))
  workdirs = {"clip": clip_stage.workdir, "decoder": decoder_info.workdir,
              **{name: info.workdir for name, info in zip(names, upsampler_infos)}}
  if prior_info is not None:
    workdirs["prior"] = prior_info.workdir
  return LoadedStages(
      clip=clip_stage,
      prior=None if prior is None else load_prior(prior_info.workdir,
                                                  _step_of(step, "prior")),
      decoder=load_decoder(decoder_info.workdir, _step_of(step, "decoder")),
      upsamplers=tuple(loaded_upsamplers), workdirs=workdirs)
