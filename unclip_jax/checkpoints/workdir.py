"""Reading a stage's workdir, in one place: its config.json, its checkpoint steps,
the EMA params of one step, and the frozen_clip.json a prior or decoder wrote.

`StageWorkdir(path, stage)` reads the config and the step list once and keeps
one read-only orbax manager open for everything read after; every error is one
line that says what to do. A damaged newest checkpoint (manager.find_damage, or
unreadable array data) is passed over for the newest one that reads, in one log
line.
"""
import json
import logging
import os
from typing import Any

import jax
import ml_collections
import orbax.checkpoint as ocp

from unclip_jax.checkpoints import manager as manager_lib
from unclip_jax.errors import DamagedCheckpoint, WorkdirError
from unclip_jax.parallel.local import local_replicated_sharding

log = logging.getLogger(__name__)

CONFIG_FILENAME = "config.json"
# What a prior or decoder was trained on: the CLIP's fingerprint and sizes (+ extras).
FROZEN_CLIP_FILENAME = "frozen_clip.json"
_TRAIN_COMMAND = ("python -m unclip_jax.train --config configs/{stage}.py:demo "
                  "--workdir {workdir}")


def train_command(stage: str, workdir: str) -> str:
  return _TRAIN_COMMAND.format(stage=stage, workdir=workdir)


def read_config(workdir: str, expected_stage: str) -> ml_collections.ConfigDict:
  """workdir/config.json (JSON data, never executed), checked to be a run of
  `expected_stage`."""
  path = os.path.join(workdir, CONFIG_FILENAME)
  if not os.path.exists(path):
    raise WorkdirError(
        f"{workdir} is not a {expected_stage} workdir (no {CONFIG_FILENAME}); train "
        f"it first with {train_command(expected_stage, workdir)}")
  with open(path) as f:
    config = ml_collections.ConfigDict(json.load(f))
  stage = config.get("stage")
  if stage != expected_stage:
    raise WorkdirError(f"{workdir} holds a {stage!r} run, not a {expected_stage!r} "
                       f"run; pass the {expected_stage} stage's workdir")
  return config


def write_json_atomically(path: str, data: dict) -> None:
  with open(path + ".tmp", "w") as f:
    json.dump(data, f)
  os.replace(path + ".tmp", path)


def read_frozen_clip(workdir: str, stage: str) -> dict:
  """The frozen_clip.json a `stage` run (prior, decoder) wrote in `workdir`."""
  path = os.path.join(workdir, FROZEN_CLIP_FILENAME)
  if not os.path.exists(path):
    raise WorkdirError(f"{workdir} has no {FROZEN_CLIP_FILENAME}; it was not "
                       f"written by a {stage} run")
  with open(path) as f:
    return json.load(f)


class StageWorkdir:
  """One trained stage's workdir, opened once: `config`, `steps`, `step(...)`,
  `restore_ema_params(...)`."""

  def __init__(self, workdir: str, stage: str):
    if not isinstance(workdir, (str, os.PathLike)):
      raise WorkdirError(f"the {stage} workdir must be a path, got {workdir!r}")
    self.path = os.path.abspath(os.fspath(workdir))
    self.stage = stage
    self.config = read_config(self.path, stage)
    self._manager = manager_lib.make_manager(self.path, read_only=True)
    has_checkpoints = os.path.isdir(manager_lib.checkpoint_dir(self.path))
    self.steps = sorted(self._manager.all_steps()) if has_checkpoints else []
    self._reported = set()  # damaged steps already logged

  def step(self, requested: int | None = None) -> int:
    """`requested`, or the newest step whose files are whole (damaged newer ones
    are logged in one line); WorkdirError when there is none."""
    if not self.steps:
      raise WorkdirError(f"{self.path} has no checkpoint; train it first with "
                         f"{train_command(self.stage, self.path)}")
    if requested is None:
      damaged = []
      for step in reversed(self.steps):
        path = manager_lib.step_dir(self._manager, step)
        if problem := manager_lib.find_damage(path, (manager_lib.STATE,)):
          damaged.append(DamagedCheckpoint(step, path, problem))
          continue
        self._report(damaged, step)
        return step
      raise self._none_readable(damaged)
    if requested not in self.steps:
      raise WorkdirError(f"{self.path} has no checkpoint at step {requested}; it "
                         f"has steps {self.steps}")
    return requested

  def commit_time(self, step: int) -> int:
    """When `step` was written (ns): tells a retrained step from the old one."""
    return self._manager.metadata(step).commit_timestamp_nsecs

  def frozen_clip(self) -> dict:
    return read_frozen_clip(self.path, self.stage)

  def _report(self, damaged: list[DamagedCheckpoint], used: int) -> None:
    new = [e for e in damaged if e.step not in self._reported]
    if new:
      self._reported.update(e.step for e in new)
      log.warning("%s: %s; using step %d", self.path, "; ".join(
          f"checkpoint {e.step} is damaged ({e.problem})" for e in new), used)

  def _none_readable(self, damaged: list[DamagedCheckpoint]) -> WorkdirError:
    return manager_lib.none_readable(
        manager_lib.checkpoint_dir(self.path), damaged,
        f"move them aside (e.g. into {self.path}/"
        f"{manager_lib.DAMAGED_DIRNAME}/) and train again with "
        f"{train_command(self.stage, self.path)}")

  def restore_newest_ema_params(self, sharding: Any = None,
                                expected: Any = None) -> tuple[int, Any]:
    """(step, its EMA params) of the newest checkpoint that reads: damaged newer
    ones are passed over and logged in one line. Arguments as
    `restore_ema_params`; WorkdirError when none reads."""
    self.step()  # no checkpoint at all: say how to train one
    damaged = []
    for step in reversed(self.steps):
      try:
        params = self.restore_ema_params(step, sharding, expected)
      except DamagedCheckpoint as e:
        damaged.append(e)
        continue
      self._report(damaged, step)
      return step, params
    raise self._none_readable(damaged)

  def restore_ema_params(self, step: int, sharding: Any = None,
                         expected: Any = None) -> Any:
    """Only the `ema_params` of checkpoint `step` (no optimizer state is read),
    placed on `sharding`: one Sharding for every leaf, a pytree of them shaped
    like the params, or None (replicated on this host's devices).

    `expected`: the params this code would build (e.g. `jax.eval_shape` of
    init); a checkpoint laid out otherwise is refused in one line, a damaged
    one too (DamagedCheckpoint, naming the file).
    """
    sharding = sharding or local_replicated_sharding()
    path = manager_lib.step_dir(self._manager, step)
    if problem := manager_lib.find_damage(path, (manager_lib.STATE,)):
      raise DamagedCheckpoint(step, path, problem)
    saved = manager_lib.saved_ema_params(self._manager, step)
    if expected is not None:
      self._check_layout(saved, expected)
    if isinstance(sharding, jax.sharding.Sharding):
      sharding = jax.tree.map(lambda _: sharding, saved)
    target = {"ema_params": jax.tree.map(
        lambda m, s: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=s),
        saved, sharding)}
    restore_args = jax.tree.map(
        lambda s: ocp.ArrayRestoreArgs(sharding=s.sharding), target)
    try:
      restored = self._manager.restore(step, args=ocp.args.Composite(**{
          manager_lib.STATE: ocp.args.PyTreeRestore(
              item=target, restore_args=restore_args, partial_restore=True)}))
    except Exception as e:  # pylint: disable=broad-except
      # The layout was checked above: what is left is the files.
      raise DamagedCheckpoint(step, path,
                              manager_lib.describe_read_error(e, path)) from e
    return restored[manager_lib.STATE]["ema_params"]

  def _check_layout(self, saved: Any, expected: Any) -> None:
    saved_shapes = manager_lib.param_shapes(saved)
    expected_shapes = manager_lib.param_shapes(expected)
    if saved_shapes.keys() == expected_shapes.keys():
      for path, shape in expected_shapes.items():
        if saved_shapes[path] != shape:
          raise WorkdirError(
              f"{self.path}: parameter {path} has shape {list(saved_shapes[path])} "
              f"in checkpoint but {list(shape)} for its config.json; the workdir "
              "was changed by hand or by another version of unclip-jax")
      return
    example = sorted(saved_shapes.keys() ^ expected_shapes.keys())[0]
    raise WorkdirError(
        f"{self.path} holds {self.stage} parameters laid out differently from this "
        f"version of unclip-jax (e.g. {example}): it predates a change of the "
        f"model's parameter names; retrain it with "
        f"{train_command(self.stage, self.path)} in a new workdir")

  def close(self) -> None:
    self._manager.close()

  def __enter__(self) -> "StageWorkdir":
    return self

  def __exit__(self, *exc) -> None:
    self.close()
