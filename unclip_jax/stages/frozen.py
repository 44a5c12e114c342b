"""What a prior or decoder checks and records of the trained CLIP it reads.

`check_clip_workdir` (at validation: one-line errors for a missing or wrong CLIP
workdir or mismatched data) and `record_frozen_clip` (at preparation: the
tokenizer and frozen_clip.json kept with the run, which the sampling pipeline's
compatibility checks and `generators.load` read).
"""
import os
import shutil
from typing import Sequence

import jax
import ml_collections

from unclip_jax.checkpoints.workdir import (FROZEN_CLIP_FILENAME, StageWorkdir,
                                            write_json_atomically)
from unclip_jax.data.sources import BUNDLED_BUILDERS
from unclip_jax.errors import ConfigError, WorkdirError
from unclip_jax.generators.clip import FrozenClip

_CLIP_HELP = ("a CLIP workdir, trained with python -m unclip_jax.train --config "
              "configs/clip.py:demo --workdir DIR")


def check_clip_workdir(config: ml_collections.ConfigDict,
                       same_data: Sequence[str]) -> ml_collections.ConfigDict:
  """The CLIP run of a prior's or decoder's `config.clip_workdir`, after one-line
  errors for a missing or wrong workdir, `data` fields (`same_data`) that differ
  from the CLIP's, and emoji the CLIP never saw."""
  c = config
  if not c.get("clip_workdir"):
    raise ConfigError(f"clip_workdir is not set; pass --config.clip_workdir=DIR, "
                      f"{_CLIP_HELP}")
  if not os.path.isdir(c.clip_workdir):
    raise WorkdirError(f"clip_workdir={c.clip_workdir} does not exist; pass "
                       f"{_CLIP_HELP}")
  with StageWorkdir(c.clip_workdir, "clip") as clip_workdir:
    clip_workdir.step(c.get("clip_step"))
    clip_config = clip_workdir.config
  for field in same_data:
    if c.data.get(field) != clip_config.data.get(field):
      raise ConfigError(
          f"data.{field}={c.data.get(field)!r} but the CLIP in {c.clip_workdir} was "
          f"trained with {clip_config.data.get(field)!r}; set "
          f"--config.data.{field}={clip_config.data.get(field)}")
  clip_emoji = clip_config.data.get("num_emoji") or 0  # 0: every emoji
  emoji = c.data.get("num_emoji") or 0
  if c.data.name in BUNDLED_BUILDERS and clip_emoji and not 0 < emoji <= clip_emoji:
    raise ConfigError(
        f"data.num_emoji={emoji} but the CLIP in {c.clip_workdir} knows only the first "
        f"{clip_emoji} emoji; set --config.data.num_emoji to at most {clip_emoji}")
  return clip_config


def record_frozen_clip(workdir: str, clip: FrozenClip, **extra) -> None:
  """Keeps with a prior's or decoder's run what it needs of its CLIP: the tokenizer
  (captions are read through it) and frozen_clip.json (fingerprint, sizes, `extra`).
  Process 0 writes; the JSON is replaced atomically."""
  if jax.process_index() != 0:
    return
  filename = clip.tokenizer.filename  # tokenizer.model, or a converted clip_bpe.json
  tokenizer_path = os.path.join(workdir, filename)
  if not os.path.exists(tokenizer_path):
    shutil.copyfile(os.path.join(clip.workdir, filename), tokenizer_path)
  write_json_atomically(os.path.join(workdir, FROZEN_CLIP_FILENAME),
                        clip.record(**extra))
