"""Checkpoints: orbax CheckpointManager over (train state, data iterator, config).

Each step directory holds `state` (params, optimizer state, EMA, step),
`data` (the grain iterator's position, one file per host) and `config` (the
resolved config as JSON), so a checkpoint is self-describing. The trainer
opens a writing manager; everything that reads a finished stage (workdir.py)
opens a read-only one, from this same function.

A damaged checkpoint (a missing, truncated or garbled file, or a write that
never finished) is reported as DamagedCheckpoint, one line naming the step and
the file; the trainer resumes from the newest checkpoint that restores.
"""
import glob
import json
import logging
import os
import re
import time
from typing import Any, Sequence

import grain
import jax
import ml_collections
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from unclip_jax.errors import DamagedCheckpoint, WorkdirError

log = logging.getLogger(__name__)

STATE, DATA, CONFIG = "state", "data", "config"
# orbax writes this last into a step directory and into each item's (in both of
# its atomicity modes): a directory without it is a write that never finished.
COMMIT_MARKER = "commit_success.txt"
STEP_METADATA = "_CHECKPOINT_METADATA"
# The JSON each item's handler writes; array data is checked by reading it.
_ITEM_JSON = {STATE: "_METADATA", CONFIG: "metadata", DATA: "*.json"}
# Where the trainer moves damaged checkpoints, beside checkpoints/: kept for a
# post-mortem (a read error may have been the disk's, not the file's), and out
# of the way of the resumed run, which writes those steps again.
DAMAGED_DIRNAME = "damaged_checkpoints"


def checkpoint_dir(workdir: str) -> str:
  return os.path.join(os.path.abspath(workdir), "checkpoints")


class _DropReadOnlyNotice(logging.Filter):
  """Orbax warns that a read-only manager's directory is read only, each time one
  is made: for a frozen stage that is the point, not news."""

  def filter(self, record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith("Given directory is read only")


def make_manager(workdir: str, config: ml_collections.ConfigDict | None = None,
                 read_only: bool = False) -> ocp.CheckpointManager:
  """The trainer's manager (keep-N, async saves), or with `read_only` one that
  reads single items of a finished run (`config` unused)."""
  if read_only:
    return _read_only_manager(workdir)
  options = ocp.CheckpointManagerOptions(
      max_to_keep=config.get("keep_checkpoints", 3),
      enable_async_checkpointing=config.get("async_checkpointing", True),
      # A preempted save leaves a tmp dir; never mistake it for a checkpoint.
      cleanup_tmp_directories=True)
  return ocp.CheckpointManager(
      checkpoint_dir(workdir), options=options,
      item_handlers={STATE: ocp.StandardCheckpointHandler(),
                     DATA: grain.checkpoint.CheckpointHandler(),
                     CONFIG: ocp.JsonCheckpointHandler()})


def _read_only_manager(workdir: str) -> ocp.CheckpointManager:
  # PyTreeCheckpointHandler (not StandardCheckpointHandler) because it can restore a
  # part of the saved tree (the EMA params alone); the other items are registered so
  # orbax knows them. Process-local: a frozen stage is read onto this host's devices
  # by whichever processes need it (only process 0 builds an embedding cache), so
  # orbax must not wait for the others at its barriers.
  logging.getLogger("absl").addFilter(_READ_ONLY_NOTICE)
  this_process = jax.process_index()
  local = ocp.options.MultiprocessingOptions(
      primary_host=this_process, active_processes={this_process},
      barrier_sync_key_prefix=f"read_only_process_{this_process}")
  return ocp.CheckpointManager(
      checkpoint_dir(workdir),
      options=ocp.CheckpointManagerOptions(read_only=True, create=False,
                                           save_interval_steps=0,
                                           multiprocessing_options=local),
      item_handlers={STATE: ocp.PyTreeCheckpointHandler(
                         multiprocessing_options=local),
                     DATA: grain.checkpoint.CheckpointHandler(),
                     CONFIG: ocp.JsonCheckpointHandler()})


_READ_ONLY_NOTICE = _DropReadOnlyNotice()


def save(manager: ocp.CheckpointManager, step: int, state: Any,
         data_iterator: Any, config: ml_collections.ConfigDict,
         force: bool = False) -> bool:
  items = {STATE: ocp.args.StandardSave(state),
           CONFIG: ocp.args.JsonSave(config.to_dict())}
  if data_iterator is not None:
    items[DATA] = grain.checkpoint.CheckpointSave(data_iterator)
  return manager.save(step, args=ocp.args.Composite(**items), force=force)


def step_dir(manager: ocp.CheckpointManager, step: int) -> str:
  return os.path.join(str(manager.directory), str(step))


def _json_problem(path: str) -> str | None:
  try:
    with open(path, encoding="utf-8") as f:
      json.load(f)
  except FileNotFoundError:
    return "missing"
  except (OSError, ValueError) as e:  # truncated, garbled, not UTF-8
    return f"not valid JSON ({str(e).splitlines()[0][:120]})"
  return None


def find_damage(path: str, items: Sequence[str]) -> str | None:
  """What is wrong with step directory `path` as "file: why", or None.

  Cheap (no array is read): the commit markers an unfinished write lacks and
  the JSON metadata a truncated or garbled file breaks, for the step and its
  `items`. Damage inside array data shows when it is read (`restore`).
  """
  names = [COMMIT_MARKER, STEP_METADATA]
  for item in items:
    if not os.path.isdir(os.path.join(path, item)):
      return f"{item}/: missing"
    names.append(os.path.join(item, COMMIT_MARKER))
    pattern = os.path.join(item, _ITEM_JSON[item])
    names += sorted(os.path.relpath(p, path) for p in
                    glob.glob(os.path.join(path, pattern))) or [pattern]
  for name in names:
    if name.endswith(COMMIT_MARKER):
      if not os.path.isfile(os.path.join(path, name)):
        return f"{name}: missing, so its write never finished"
    elif problem := _json_problem(os.path.join(path, name)):
      return f"{name}: {problem}"
  return None


_STATUS = re.compile(r"^([A-Z][A-Z_]+): ")  # tensorstore's absl status code
_LOCAL_FILE = re.compile(r'local file "([^"]+)"')
_ARRAY_KEY = re.compile(r'Error reading "([^"]+)" in OCDBT database')


def describe_read_error(error: BaseException, path: str) -> str:
  """"file (reading array): CODE: why" for an error raised reading step
  directory `path`, from the innermost cause that names a path in it: orbax
  wraps tensorstore's errors, whose text names the array and the file."""
  chain = []
  while error is not None and len(chain) < 16:
    chain.append(error)
    error = error.__cause__ or error.__context__
  cause = next((e for e in reversed(chain) if path in str(e)), chain[-1])
  text = str(cause).split(" [tensorstore_spec=")[0].strip()
  code = type(cause).__name__
  if status := _STATUS.match(text):
    code, text = status.group(1), text[status.end():]
  named = ([f for f in _LOCAL_FILE.findall(text) if not f.endswith("/")] or
           re.findall(re.escape(path) + r"/[^\s'\"),]*[^\s'\"),/]", text))
  if named:
    where = os.path.relpath(named[-1], path)
    text = text.rsplit('"', 1)[-1].lstrip(": ")  # the reason follows the path
  else:
    where = "a file"
  if key := _ARRAY_KEY.search(str(cause)):
    where += f" (reading {key.group(1)})"
  reason = (text.splitlines() or [""])[0][:200]
  return f"{where}: {code}" + (f": {reason}" if reason else "")


def param_shapes(tree: Any) -> dict[str, tuple]:
  return {jax.tree_util.keystr(path): tuple(leaf.shape) for path, leaf in
          jax.tree_util.tree_flatten_with_path(tree)[0]}


def saved_ema_params(manager: ocp.CheckpointManager, step: int) -> Any:
  """The metadata tree (shapes, dtypes; no array read) of checkpoint `step`'s
  EMA params; DamagedCheckpoint when its metadata does not read."""
  try:
    saved = manager.item_metadata(step)[STATE]
    return getattr(saved, "tree", saved)["ema_params"]
  except Exception as e:  # pylint: disable=broad-except
    path = step_dir(manager, step)
    raise DamagedCheckpoint(step, path, describe_read_error(e, path)) from e


def _check_layout(manager: ocp.CheckpointManager, step: int,
                  abstract_state: Any) -> None:
  """A checkpoint of another model layout is the config's or version's fault,
  not damage: it must not send the trainer to an older checkpoint."""
  expected = getattr(abstract_state, "ema_params", None)
  if expected is None:
    return
  saved = saved_ema_params(manager, step)
  saved_shapes, expected_shapes = param_shapes(saved), param_shapes(expected)
  if saved_shapes != expected_shapes:
    differ = sorted(k for k in saved_shapes.keys() | expected_shapes.keys()
                    if saved_shapes.get(k) != expected_shapes.get(k))
    raise WorkdirError(
        f"checkpoint {step} in {manager.directory} does not match this config or "
        f"version of unclip-jax (parameter {differ[0]}: "
        f"{saved_shapes.get(differ[0])} in the checkpoint, "
        f"{expected_shapes.get(differ[0])} now; it may predate a change of the "
        "model's parameter names); restore with the config and version it was "
        "saved with, or move it aside to start over")


def restore(manager: ocp.CheckpointManager, step: int, abstract_state: Any,
            data_iterator: Any = None) -> Any:
  """Restores onto the shardings carried by `abstract_state` (any mesh).

  DamagedCheckpoint for an unfinished or unreadable checkpoint; WorkdirError for
  one of another parameter layout.
  """
  path = step_dir(manager, step)
  items = {STATE: ocp.args.StandardRestore(abstract_state)}
  if data_iterator is not None:
    items[DATA] = grain.checkpoint.CheckpointRestore(data_iterator)
  if problem := find_damage(path, tuple(items) + (CONFIG,)):
    raise DamagedCheckpoint(step, path, problem)
  _check_layout(manager, step, abstract_state)
  try:
    restored = manager.restore(step, args=ocp.args.Composite(**items))
  except Exception as e:  # pylint: disable=broad-except
    # tensorstore raises bare Exceptions; the layout was checked above, so what
    # is left is the files.
    raise DamagedCheckpoint(step, path, describe_read_error(e, path)) from e
  return restored[STATE]


def none_readable(directory: str, damaged: Sequence[DamagedCheckpoint],
                  fix: str) -> WorkdirError:
  """The one-line error when every checkpoint tried was damaged."""
  reasons = "; ".join(f"step {e.step}: {e.problem}" for e in damaged)
  return WorkdirError(f"no checkpoint in {directory} can be read (tried steps "
                      f"{[e.step for e in damaged]}: {reasons}); {fix}")


def newest_whole_step(manager: ocp.CheckpointManager) -> int | None:
  """The newest step whose files are all there (`find_damage`): where a resumed
  run starts unless its array data turns out unreadable."""
  for step in sorted(manager.all_steps(), reverse=True):
    if find_damage(step_dir(manager, step), (STATE, CONFIG)) is None:
      return step
  return None


def _move_aside(manager: ocp.CheckpointManager,
                damaged: Sequence[DamagedCheckpoint]) -> None:
  if not damaged:
    return
  root = os.path.join(os.path.dirname(str(manager.directory)), DAMAGED_DIRNAME)
  if jax.process_index() == 0:
    os.makedirs(root, exist_ok=True)
    for error in damaged:
      target = os.path.join(root, str(error.step))
      if os.path.exists(target):  # damaged at this step before
        target += f"-{time.time_ns()}"
      os.rename(error.step_dir, target)
      log.warning("checkpoint %d is damaged (%s); moved it to %s and resuming "
                  "from an older one", error.step, error.problem, target)
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices("unclip_jax: damaged checkpoints moved")
  manager.reload()  # forget the moved steps, so they are written again


def restore_newest(manager: ocp.CheckpointManager, abstract_state: Any,
                   data_iterator: Any = None) -> tuple[int | None, Any]:
  """(step, state) of the newest checkpoint that restores, or (None, None)
  when there is none yet.

  Steps are tried newest first; damaged newer ones are moved to
  damaged_checkpoints/ beside checkpoints/ (one log line each, naming the step
  and the file). WorkdirError, naming the steps tried, when none restores.
  """
  damaged = []
  for step in sorted(manager.all_steps(), reverse=True):
    try:
      state = restore(manager, step, abstract_state, data_iterator)
    except DamagedCheckpoint as e:
      damaged.append(e)
      continue
    _move_aside(manager, damaged)
    return step, state
  if damaged:
    raise none_readable(
        str(manager.directory), damaged,
        "if they were written by another config or version of unclip-jax, resume "
        "with that one; otherwise move them aside (e.g. into "
        f"{os.path.join(os.path.dirname(str(manager.directory)), DAMAGED_DIRNAME)})"
        " to train from scratch")
  return None, None


def restore_config(manager: ocp.CheckpointManager,
                   step: int) -> ml_collections.ConfigDict:
  restored = manager.restore(
      step, args=ocp.args.Composite(**{CONFIG: ocp.args.JsonRestore()}))
  return ml_collections.ConfigDict(restored[CONFIG])
