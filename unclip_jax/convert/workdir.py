"""Converted weights as ordinary workdirs: config.json, one orbax checkpoint
(step 0, the params as its `ema_params`), and for stages that read a CLIP its
frozen_clip.json, so that `StageWorkdir`, `generators.load`, `FrozenClip` and
`UnCLIPPipeline.from_workdirs` read them exactly as trained ones."""
import contextlib
import json
import os
import shutil
from typing import Any

import jax
import ml_collections
import numpy as np

from unclip_jax.checkpoints import manager as manager_lib
from unclip_jax.checkpoints.workdir import (CONFIG_FILENAME, FROZEN_CLIP_FILENAME,
                                            write_json_atomically)
from unclip_jax.errors import ConversionError

STEP = 0  # converted checkpoints are step 0: no training has happened here


def check_new(path: str) -> str:
  """`path` (absolute) if it is absent or an empty directory: a conversion never
  writes over a workdir."""
  path = os.path.abspath(path)
  if os.path.exists(path) and (not os.path.isdir(path) or os.listdir(path)):
    raise ConversionError(f"{path} exists and is not empty; pass a new --out "
                          "directory (a conversion never overwrites a workdir)")
  return path


def prepare(path: str) -> str:
  """`path` created (or empty), absolute."""
  path = check_new(path)
  os.makedirs(path, exist_ok=True)
  return path


@contextlib.contextmanager
def written_whole(path: str):
  """Yields a directory to write into that becomes `path` only when the block
  ends without an error: an interrupted or failed conversion leaves nothing at
  `path` (and its half-written `path.partial` is removed, or replaced by the
  next try)."""
  path = check_new(path)
  partial = path + ".partial"
  shutil.rmtree(partial, ignore_errors=True)
  os.makedirs(partial)
  try:
    yield partial
  except BaseException:
    shutil.rmtree(partial, ignore_errors=True)
    raise
  if os.path.isdir(path):
    os.rmdir(path)  # empty (check_new)
  os.replace(partial, path)


def write_stage(path: str, config: ml_collections.ConfigDict, params: Any, *,
                frozen_clip: dict | None = None) -> str:
  """Writes a workdir for `config.stage` holding `params` (numpy or jax arrays,
  laid out as the stage's module's init) as checkpoint 0; returns its path."""
  path = prepare(path)
  config = ml_collections.ConfigDict(config)
  with open(os.path.join(path, CONFIG_FILENAME), "w") as f:
    json.dump(json.loads(config.to_json()), f, indent=2)
  params = jax.tree.map(lambda x: np.asarray(x, np.float32)
                        if np.asarray(x).dtype.kind == "f" else np.asarray(x), params)
  manager = manager_lib.make_manager(path, ml_collections.ConfigDict(
      {"keep_checkpoints": 1, "async_checkpointing": False}))
  try:
    manager_lib.save(manager, STEP, {"ema_params": params}, None, config, force=True)
    manager.wait_until_finished()
  finally:
    manager.close()
  if frozen_clip is not None:
    write_json_atomically(os.path.join(path, FROZEN_CLIP_FILENAME), frozen_clip)
  return path
