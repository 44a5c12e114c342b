"""Checkpoints: orbax CheckpointManager over (train state, data iterator, config).

Each step directory holds `state` (params, optimizer state, EMA, step),
`data` (the grain iterator's position, one file per host) and `config` (the
resolved config as JSON), so a checkpoint is self-describing.
"""
import os
from typing import Any

import grain
import ml_collections
import orbax.checkpoint as ocp

STATE, DATA, CONFIG = "state", "data", "config"


def checkpoint_dir(workdir: str) -> str:
  return os.path.join(os.path.abspath(workdir), "checkpoints")


def make_manager(workdir: str, config: ml_collections.ConfigDict,
                 read_only: bool = False) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(
      max_to_keep=config.get("keep_checkpoints", 3),
      enable_async_checkpointing=config.get("async_checkpointing", True),
      create=not read_only, read_only=read_only,
      # A preempted save leaves a tmp dir; never mistake it for a checkpoint.
      cleanup_tmp_directories=not read_only)
  return ocp.CheckpointManager(
      checkpoint_dir(workdir), options=options,
      item_handlers={STATE: ocp.StandardCheckpointHandler(),
                     DATA: grain.checkpoint.CheckpointHandler(),
                     CONFIG: ocp.JsonCheckpointHandler()})


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
    raise RuntimeError(
        f"checkpoint {step} in {manager.directory} is unreadable or does not "
        f"match this config ({type(e).__name__}: {str(e).splitlines()[0]}); "
        "move it aside to start over, or restore with the config it was "
        "saved with") from e
  return restored[STATE]


def restore_config(manager: ocp.CheckpointManager,
                   step: int) -> ml_collections.ConfigDict:
  restored = manager.restore(
      step, args=ocp.args.Composite(**{CONFIG: ocp.args.JsonRestore()}))
  return ml_collections.ConfigDict(restored[CONFIG])
