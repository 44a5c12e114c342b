"""Checkpoints: orbax CheckpointManager over (train state, data iterator, config).

Each step directory holds `state` (params, optimizer state, EMA, step),
`data` (the grain iterator's position, one file per host) and `config` (the
resolved config as JSON), so a checkpoint is self-describing. The trainer
opens a writing manager; everything that reads a finished stage (workdir.py)
opens a read-only one, from this same function.
"""
import logging
import os
from typing import Any

import grain
import jax
import ml_collections
import orbax.checkpoint as ocp

from unclip_jax.errors import WorkdirError

STATE, DATA, CONFIG = "state", "data", "config"


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


def restore(manager: ocp.CheckpointManager, step: int, abstract_state: Any,
            data_iterator: Any = None) -> Any:
  """Restores onto the shardings carried by `abstract_state` (any mesh)."""
  items = {STATE: ocp.args.StandardRestore(abstract_state)}
  if data_iterator is not None:
    items[DATA] = grain.checkpoint.CheckpointRestore(data_iterator)
  try:
    restored = manager.restore(step, args=ocp.args.Composite(**items))
  except (ValueError, KeyError, FileNotFoundError, OSError) as e:
    raise WorkdirError(
        f"checkpoint {step} in {manager.directory} is unreadable or does not "
        f"match this config or version of unclip-jax (it may predate a change of "
        f"the model's parameter names) ({type(e).__name__}: "
        f"{str(e).splitlines()[0] if str(e) else ''}); move it aside to start over, "
        "or restore with the config and version it was saved with") from e
  return restored[STATE]


def restore_config(manager: ocp.CheckpointManager,
                   step: int) -> ml_collections.ConfigDict:
  restored = manager.restore(
      step, args=ocp.args.Composite(**{CONFIG: ocp.args.JsonRestore()}))
  return ml_collections.ConfigDict(restored[CONFIG])
