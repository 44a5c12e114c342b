"""Do the stages fit together? One-line errors naming the pair that does not.

Checked from configs and the `frozen_clip.json` the prior and decoder wrote at
training (what CLIP they read, its sizes), before any params are restored:
- clip / prior, clip / decoder: embedding width, text sizes, tokenizer, and the
  exact CLIP checkpoint (its fingerprint, the workdir path aside, so that moved
  or copied workdirs still match);
- decoder / upsampler 1, upsampler i / upsampler i+1: each stage's output side
  is the next one's input side.
"""
import dataclasses
import os

import ml_collections

from unclip_jax.errors import UserError
from unclip_jax.generators.clip import FrozenClip


class IncompatibleStagesError(UserError):
  """Two stages that were not trained to work together."""


@dataclasses.dataclass(frozen=True)
class StageInfo:
  """What the checks read of one stage's workdir."""
  name: str  # "prior", "decoder", "upsampler 1", ...
  workdir: str
  config: ml_collections.ConfigDict
  frozen_clip: dict | None  # frozen_clip.json of a prior or decoder


def _checkpoint_id(fingerprint: str) -> str:
  """step:commit time:config hash, without the workdir path."""
  return fingerprint.rpartition("@")[2]


def _fail(first: str, second: str, problem: str) -> None:
  raise IncompatibleStagesError(f"{first} and {second} do not fit together: "
                                f"{problem}")


def _check_reads_clip(clip: FrozenClip, stage: StageInfo, fields: tuple) -> None:
  trained_on = stage.frozen_clip
  clip_values = {"embed_dim": clip.embed_dim, "text_width": clip.text_width,
                 "context_length": clip.context_length}
  where = f"the {stage.name} ({stage.workdir})"
  for field in fields:
    if trained_on[field] != clip_values[field]:
      _fail(f"the CLIP ({clip.workdir})", where,
            f"the {stage.name} was trained on a CLIP with {field}="
            f"{trained_on[field]}, this CLIP has {clip_values[field]}; pass "
            f"the CLIP it was trained on ({trained_on['workdir']})")
  tokenizer = os.path.join(stage.workdir, clip.tokenizer.filename)
  if os.path.exists(tokenizer):
    with open(tokenizer, "rb") as f:
      if f.read() != clip.tokenizer.serialized:
        _fail(f"the CLIP ({clip.workdir})", where,
              f"their {clip.tokenizer.filename} files differ")
  if _checkpoint_id(trained_on["fingerprint"]) != _checkpoint_id(clip.fingerprint):
    _fail(f"the CLIP ({clip.workdir}, step {clip.step})", where,
          f"the {stage.name} was trained on the CLIP at "
          f"{trained_on['workdir']} step {trained_on['step']}; pass that CLIP, or "
          f"retrain the {stage.name} on this one")


def check_chain(clip: FrozenClip, prior: StageInfo | None, decoder: StageInfo,
                upsamplers: list[StageInfo]) -> None:
  """Raises IncompatibleStagesError for the first pair that does not fit."""
  arch = lambda stage: stage.config.get("model", {}).get("arch", "unclip-jax")
  if prior is not None and arch(prior) != arch(decoder):
    _fail(f"the prior ({prior.workdir})", f"the decoder ({decoder.workdir})",
          f"a {arch(prior)} prior makes embeddings for a {arch(prior)} decoder, "
          f"not a {arch(decoder)} one; pass the decoder converted or trained with it")
  if prior is not None:
    _check_reads_clip(clip, prior, ("embed_dim", "text_width", "context_length"))
  _check_reads_clip(clip, decoder, ("embed_dim",))
  vocab = int(clip.config.tokenizer.vocab_size)
  if decoder.frozen_clip["vocab_size"] < vocab:
    _fail(f"the CLIP ({clip.workdir})", f"the decoder ({decoder.workdir})",
          f"the decoder embeds {decoder.frozen_clip['vocab_size']} token ids, the "
          f"CLIP's tokenizer has {vocab}")
  previous, side = decoder, decoder.config.data.resolution
  for upsampler in upsamplers:
    low_res = upsampler.config.model.low_res
    if low_res != side:
      _fail(f"the {previous.name} ({previous.workdir})",
            f"the {upsampler.name} ({upsampler.workdir})",
            f"the {previous.name} makes {side} px images, the {upsampler.name} "
            f"takes {low_res} px ones; order the upsamplers from low to high "
            "resolution")
    previous, side = upsampler, upsampler.config.data.resolution
