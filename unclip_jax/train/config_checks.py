"""Checks that fail fast, with one line naming the fix, before anything compiles."""
import json
import math
import os

import jax
import ml_collections

from unclip_jax.errors import ConfigError, WorkdirError
from unclip_jax.models import remat
from unclip_jax.models.precision import DTYPES
from unclip_jax.parallel.mesh import resolve_shape

# Fields whose change makes an existing workdir's checkpoints unusable.
_IDENTITY_FIELDS = ("stage", "model", "diffusion", "data.name", "data.resolution",
                    "data.num_emoji", "tokenizer")
# Model fields that change memory and speed, never the params: a run may
# resume with other values.
_MEMORY_ONLY_MODEL_FIELDS = ("remat", "remat_policy")


def _positive(config, *names):
  for name in names:
    value = config
    for part in name.split("."):
      value = value[part]
    if not isinstance(value, (int, float)) or value <= 0:
      raise ConfigError(f"{name}={value!r} must be > 0; set --config.{name}")


def check_common(config: ml_collections.ConfigDict,
                 num_devices: int | None = None,
                 num_processes: int | None = None) -> None:
  """Checks the shared fields for `num_devices` devices over `num_processes`
  hosts (default: this job's; the compile command passes a TPU slice's)."""
  num_devices = jax.device_count() if num_devices is None else num_devices
  num_processes = (jax.process_count() if num_processes is None
                   else num_processes)
  _positive(config, "total_steps", "batch_size", "log_every", "eval_every",
            "checkpoint_every", "optim.lr")
  if config.dtype not in DTYPES:
    raise ConfigError(f"dtype={config.dtype!r}: use one of {sorted(DTYPES)}")
  for field in _MEMORY_ONLY_MODEL_FIELDS:
    value = config.get("model", {}).get(field)
    if value is not None and not isinstance(value, bool) and (
        value not in remat.REMAT_POLICIES):
      raise ConfigError(f"model.{field}={value!r}: use one of "
                        f"{', '.join(remat.REMAT_POLICIES)}")
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
    mesh_shape = resolve_shape(config.mesh.shape, num_devices // num_slices)
  except ValueError as e:
    raise ConfigError(str(e)) from None
  data_parallel = mesh_shape[0] * mesh_shape[1] * num_slices
  if config.batch_size % data_parallel:
    raise ConfigError(
        f"batch_size={config.batch_size} does not divide over {data_parallel} "
        f"data-parallel shards (mesh {mesh_shape}); set --config.batch_size "
        f"to a multiple of {data_parallel}")
  accum = config.optim.get("grad_accum_steps", 1)
  if not isinstance(accum, int) or accum < 1:
    raise ConfigError(f"optim.grad_accum_steps={accum!r} must be an integer "
                      ">= 1")
  if config.batch_size % (data_parallel * accum):
    raise ConfigError(
        f"batch_size={config.batch_size} does not split into "
        f"optim.grad_accum_steps={accum} microbatches over {data_parallel} "
        f"data-parallel shards; use a batch_size that divides by "
        f"{data_parallel * accum}")
  if config.batch_size % num_processes:
    raise ConfigError(f"batch_size={config.batch_size} must divide over "
                      f"{num_processes} hosts")


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
      old, new = (_identity(_get(c, field), field) for c in (previous, resolved))
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


def _identity(value, field: str):
  if field == "model" and isinstance(value, dict):
    return {k: v for k, v in value.items()
            if k not in _MEMORY_ONLY_MODEL_FIELDS}
  return value


def _short(value, limit=80):
  text = json.dumps(value, sort_keys=True)
  return text if len(text) <= limit else text[:limit] + "..."
