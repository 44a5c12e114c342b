"""Checks that fail fast, with one line naming the fix, before anything compiles."""
import json
import math
import os

import jax
import ml_collections

from unclip_jax.errors import ConfigError, WorkdirError
from unclip_jax.parallel.mesh import resolve_shape

# Fields whose change makes an existing workdir's checkpoints unusable.
_IDENTITY_FIELDS = ("stage", "model", "data.name", "data.resolution",
                    "data.num_emoji", "tokenizer")


def _positive(config, *names):
  for name in names:
    value = config
    for part in name.split("."):
      value = value[part]
    if not isinstance(value, (int, float)) or value <= 0:
      raise ConfigError(f"{name}={value!r} must be > 0; set --config.{name}")


def check_common(config: ml_collections.ConfigDict) -> None:
  _positive(config, "total_steps", "batch_size", "log_every", "eval_every",
            "checkpoint_every", "optim.lr")
  if config.dtype not in ("float32", "bfloat16"):
    raise ConfigError(f"dtype={config.dtype!r}: use 'float32' or 'bfloat16'")
  if not 0.0 <= config.optim.ema_decay < 1.0:
    raise ConfigError(f"optim.ema_decay={config.optim.ema_decay}: must be in "
                      "[0, 1)")
  if config.optim.warmup_steps < 0:
    raise ConfigError("optim.warmup_steps must be >= 0")
  if any(int(s) < 1 for s in config.mesh.dcn_shape):
    raise ConfigError(f"mesh.dcn_shape={tuple(config.mesh.dcn_shape)}: use "
                      "positive sizes (slices per axis)")
  num_slices = math.prod(config.mesh.dcn_shape)
  try:
    mesh_shape = resolve_shape(config.mesh.shape,
                               jax.device_count() // num_slices)
  except ValueError as e:
    raise ConfigError(str(e)) from None
  data_parallel = mesh_shape[0] * mesh_shape[1] * num_slices
  if config.batch_size % data_parallel:
    raise ConfigError(
        f"batch_size={config.batch_size} does not divide over {data_parallel} "
        f"data-parallel shards (mesh {mesh_shape}); set --config.batch_size "
        f"to a multiple of {data_parallel}")
  if config.batch_size % jax.process_count():
    raise ConfigError(f"batch_size={config.batch_size} must divide over "
                      f"{jax.process_count()} hosts")


def _get(config_dict: dict, dotted: str):
  value = config_dict
  for part in dotted.split("."):
    if not isinstance(value, dict) or part not in value:
      return None
    value = value[part]
  return value


def prepare_workdir(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Creates the workdir, or checks an existing one is this run's, and writes
  the resolved config to workdir/config.json."""
  path = os.path.join(workdir, "config.json")
  resolved = json.loads(config.to_json())
  if os.path.exists(path):
    with open(path) as f:
      previous = json.load(f)
    for field in _IDENTITY_FIELDS:
      old, new = _get(previous, field), _get(resolved, field)
      if old != new:
        raise WorkdirError(
            f"workdir {workdir} holds a run with a different {field} "
            f"({_short(old)} there, {_short(new)} now); use a new --workdir "
            "or the config it was trained with")
  if jax.process_index() == 0:
    os.makedirs(workdir, exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
      json.dump(resolved, f, indent=2, sort_keys=True)
    os.replace(tmp, path)


def _short(value, limit=80):
  text = json.dumps(value, sort_keys=True)
  return text if len(text) <= limit else text[:limit] + "..."
