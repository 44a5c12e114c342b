"""Loading a chain of trained stages from their workdirs: each workdir is opened
once (config, checkpoint steps: cheap, one-line errors for a missing, empty or
wrong-stage workdir), then the compatibility checks, then the EMA params."""
import dataclasses
import re
from typing import Mapping, Sequence

from unclip_jax import generators
from unclip_jax.checkpoints.workdir import StageWorkdir
from unclip_jax.errors import UserError
from unclip_jax.generators.base import Trained
from unclip_jax.generators.clip import FrozenClip
from unclip_jax.pipeline import compat

Steps = int | Mapping[str, int] | None


@dataclasses.dataclass(frozen=True)
class LoadedStages:
  clip: FrozenClip
  prior: Trained | None
  decoder: Trained
  upsamplers: tuple[Trained, ...]
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


def _open(workdir: str, stage: str, name: str, step: int | None
          ) -> tuple[StageWorkdir, compat.StageInfo]:
  reader = StageWorkdir(workdir, stage)
  reader.step(step)  # a missing checkpoint fails before anything is restored
  frozen_clip = reader.frozen_clip() if stage in generators.READS_CLIP else None
  return reader, compat.StageInfo(name, reader.path, reader.config, frozen_clip)


def load_stages(clip: str, decoder: str, prior: str | None = None,
                upsamplers: Sequence[str] = (), step: Steps = None) -> LoadedStages:
  """Every stage's config, EMA params and checkpoint step, checked to fit."""
  if isinstance(upsamplers, str) or hasattr(upsamplers, "__fspath__"):
    upsamplers = [upsamplers]
  names = upsampler_names(len(upsamplers))
  clip_stage = FrozenClip(clip, step=_step_of(step, "clip"))
  opened = {}
  if prior is not None:
    opened["prior"] = _open(prior, "prior", "prior", _step_of(step, "prior"))
  opened["decoder"] = _open(decoder, "decoder", "decoder", _step_of(step, "decoder"))
  for i, (workdir, name) in enumerate(zip(upsamplers, names)):
    label = f"upsampler {i + 1}" if len(names) > 1 else "upsampler"
    opened[name] = _open(workdir, "upsampler", label, _step_of(step, name))
  try:
    compat.check_chain(clip_stage, opened["prior"][1] if prior is not None else None,
                       opened["decoder"][1], [opened[n][1] for n in names])
    loaded = {name: generators.load(reader, reader.stage, _step_of(step, name))
              for name, (reader, _) in opened.items()}
  finally:
    for reader, _ in opened.values():
      reader.close()
  return LoadedStages(
      clip=clip_stage, prior=loaded.get("prior"), decoder=loaded["decoder"],
      upsamplers=tuple(loaded[n] for n in names),
      workdirs={"clip": clip_stage.workdir,
                **{name: reader.path for name, (reader, _) in opened.items()}})
