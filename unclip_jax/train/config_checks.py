"""Checks that fail fast, with one line naming the fix, before anything compiles."""
import difflib
import json
import math
import os
import shutil
import tempfile

import jax
import ml_collections

from unclip_jax.errors import ConfigError, WorkdirError
from unclip_jax.models import remat
from unclip_jax.models.precision import DTYPES
from unclip_jax.parallel import mesh as mesh_lib

# Fields (and subtrees) whose change makes an existing workdir's checkpoints
# unusable: other params, other data, another tokenizer.
_IDENTITY_FIELDS = ("stage", "model", "diffusion", "data.name", "data.resolution",
                    "data.num_emoji", "tokenizer")
# Model fields that change memory and speed, never the params: a run may
# resume with other values.
_MEMORY_ONLY_MODEL_FIELDS = ("remat", "remat_policy")
# Fields that change the optimizer state's layout (clipping on or off adds a
# state), normalized to what matters.
_STATE_FIELDS = {"optim.grad_clip": bool}
# How a message names a change, by the field's first part.
_WHAT_CHANGES = {"data": "different data", "tokenizer": "a different tokenizer",
                 "optim": "a different optimizer state"}
_MISSING = object()  # a field one of two configs lacks
# Fields added after workdirs were written: what their absence from an older
# config.json meant (the behaviour before the field existed), so that resuming
# such a run with the default config is no change.
_ABSENT_MEANS = {
    "diffusion.snr_shift": 1.0,
    "tokenizer.kind": "sentencepiece",
    "model.activation": "gelu",
    "model.layer_norm_eps": 1e-5,
    "model.vision_mlp_ratio": None,
    "model.text_mlp_ratio": None,
    "model.text_pooling": "last_non_pad",
    "model.end_id": 2,
    "model.text_key_padding_mask": True,
    "model.image_mean": None,
    "model.image_std": None,
}
# One checkpoint on disk: the train state's bytes, +10%, + 16 MiB (orbax's
# metadata, the data iterator's state, the config).
_CHECKPOINT_MARGIN = 1.1
_CHECKPOINT_OVERHEAD_BYTES = 16 * 2**20


def _positive(config, *names):
  for name in names:
    value = config
    for part in name.split("."):
      value = value[part]
    if not isinstance(value, (int, float)) or value <= 0:
      raise ConfigError(f"{name}={value!r} must be > 0; set --config.{name}")


def check_dataset(data: ml_collections.ConfigDict) -> None:
  """`data.name` is a bundled dataset, or a TFDS one that is prepared in
  `data.data_dir` (or that `data.download` lets tfds prepare)."""
  # Imported here: tfds is slow to import, and compiling never reads data.
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
  from unclip_jax.data.sources import BUNDLED_BUILDERS  # pylint: disable=import-outside-toplevel
  if data.name in BUNDLED_BUILDERS:
    return
  where = data.get("data_dir") or "the tfds default data_dir"
  try:
    builder = tfds.builder(data.name, data_dir=data.get("data_dir"))
  except tfds.core.registered.DatasetNotFoundError:
    known = [*BUNDLED_BUILDERS, *tfds.list_builders(with_community_datasets=False)]
    close = difflib.get_close_matches(data.name, known, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise ConfigError(
        f"data.name={data.name!r} is no dataset{hint}: not bundled "
        f"({', '.join(BUNDLED_BUILDERS)}), not registered with tfds, not prepared "
        f"in {where}; set --config.data.name (or --config.data.data_dir)"
        ) from None
  if not builder.is_prepared() and not data.get("download", False):
    raise ConfigError(
        f"data.name={data.name!r} is not prepared in {where}; prepare it as "
        f"array_record (tfds build {data.name} --file_format=array_record) or "
        "set --config.data.download=True")


def check_common(config: ml_collections.ConfigDict,
                 num_devices: int | None = None,
                 num_processes: int | None = None,
                 num_slices: int | None = None,
                 reads_data: bool = True) -> None:
  """Checks the shared fields for `num_devices` devices in `num_slices` slices
  over `num_processes` hosts (default: this job's; the compile command passes
  a TPU slice's). `reads_data`: also check that `data.name` can be read."""
  if num_devices is None:
    num_devices = jax.device_count()
    num_slices = mesh_lib.num_slices(jax.devices())
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
  num_slices = num_slices or 1
  requested = config.mesh.dcn_shape
  if all(isinstance(s, int) and s > 0 for s in requested) and (
      math.prod(requested) != num_slices):
    # On one slice (a CPU, a GPU host, one TPU slice) it must be (1, 1, 1).
    raise ConfigError(
        f"mesh.dcn_shape={tuple(requested)} spreads the mesh over "
        f"{math.prod(requested)} slices, but the {num_devices} devices form "
        f"{num_slices}; set --config.mesh.dcn_shape so its sizes multiply to "
        f"{num_slices}, e.g. ({num_slices},1,1)")
  try:
    dcn_shape = mesh_lib.resolve_shape(requested, num_slices, "mesh.dcn_shape",
                                       "slices")
    mesh_shape = mesh_lib.resolve_shape(config.mesh.shape,
                                        num_devices // math.prod(dcn_shape))
  except ValueError as e:
    raise ConfigError(str(e)) from None
  data_parallel = mesh_shape[0] * mesh_shape[1] * math.prod(dcn_shape)
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
  if reads_data:
    check_dataset(config.data)


def _leaves(tree: dict, prefix: str = "") -> dict:
  """{"a": {"b": 1}} -> {"a.b": 1}."""
  flat = {}
  for key, value in tree.items():
    name = f"{prefix}{key}"
    if isinstance(value, dict):
      flat.update(_leaves(value, name + "."))
    else:
      flat[name] = value
  return flat


def _changes_the_run(field: str) -> bool:
  if field in {f"model.{name}" for name in _MEMORY_ONLY_MODEL_FIELDS}:
    return False
  return field in _STATE_FIELDS or any(
      field == f or field.startswith(f + ".") for f in _IDENTITY_FIELDS)


def changed_identity_fields(previous: dict, resolved: dict
                            ) -> list[tuple[str, object, object]]:
  """(field, value in `previous`, value in `resolved`) for every leaf of two
  resolved configs (as JSON data) that changes the model, its data or the
  optimizer state's layout; sorted by field. Logging, evaluation, step
  counts, learning rates and the mesh may change between runs."""
  old, new = _leaves(previous), _leaves(resolved)
  changed = []
  for field in sorted(old.keys() | new.keys()):
    if not _changes_the_run(field):
      continue
    normalize = _STATE_FIELDS.get(field, lambda value: value)
    before = old.get(field, _ABSENT_MEANS.get(field, _MISSING))
    after = new.get(field, _ABSENT_MEANS.get(field, _MISSING))
    if normalize(before) != normalize(after):
      changed.append((field, before, after))
  return changed


def _flag_value(value) -> str:
  if isinstance(value, list):  # a tuple, after JSON
    return "(" + ",".join(_flag_value(v) for v in value) + ")"
  return "unset" if value is _MISSING else str(value)


def _refuse_other_run(workdir: str, previous: dict, resolved: dict) -> None:
  if previous.get("stage") != resolved.get("stage"):
    raise WorkdirError(
        f"workdir {workdir} holds a {previous.get('stage')} run, not a "
        f"{resolved.get('stage')} run; pass another --workdir for the "
        f"{resolved.get('stage')}")
  changed = changed_identity_fields(previous, resolved)
  if not changed:
    return
  field, old, new = changed[0]
  more = ("" if len(changed) == 1 else f" (and {len(changed) - 1} more: "
          f"{', '.join(f for f, _, _ in changed[1:4])}"
          f"{', ...' if len(changed) > 4 else ''})")
  fix = f" or --config.{field}={_flag_value(old)}" if old is not _MISSING else ""
  what = _WHAT_CHANGES.get(field.split(".")[0], "a different model")
  raise WorkdirError(
      f"workdir {workdir} holds a run with {what}: it was trained with "
      f"{field}={_flag_value(old)}, this config has {field}={_flag_value(new)}"
      f"{more}; its checkpoints cannot resume that: pass a new --workdir{fix}")


def _read_previous_config(path: str) -> dict:
  """workdir/config.json, read as JSON data (never executed)."""
  try:
    with open(path) as f:
      previous = json.load(f)
  except (OSError, ValueError) as e:
    raise WorkdirError(f"cannot read {path} ({e}); restore it from a "
                       "checkpoint's config item, or pass a new --workdir"
                       ) from None
  if not isinstance(previous, dict):
    raise WorkdirError(f"{path} holds no config; pass a new --workdir")
  return previous


def make_writable_dir(path: str, flag: str = "--workdir") -> None:
  """Creates the folder `path` and checks that a file can be written in it:
  one line naming `flag` otherwise (a file there, no permission, a read-only
  or full disk)."""
  if os.path.exists(path) and not os.path.isdir(path):
    raise WorkdirError(f"{flag}={path} is a file, not a folder; pass a folder "
                       "(it is created if missing)")
  try:
    os.makedirs(path, exist_ok=True)
    with tempfile.TemporaryFile(dir=path):
      pass
  except OSError as e:
    reason = e.strerror or str(e)
    raise WorkdirError(f"cannot write to {flag}={path} ({reason}); pass a "
                       f"{flag} in a folder you can write to") from None


def prepare_workdir(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Creates the workdir, or checks an existing one is this run's (same stage,
  no change of a field that the checkpoints depend on), and writes the
  resolved config to workdir/config.json."""
  path = os.path.join(workdir, "config.json")
  resolved = json.loads(config.to_json())
  if os.path.exists(path):
    _refuse_other_run(workdir, _read_previous_config(path), resolved)
  if jax.process_index() == 0:
    make_writable_dir(workdir)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
      json.dump(resolved, f, indent=2, sort_keys=True)
    os.replace(tmp, path)


def checkpoint_bytes(abstract_state) -> int:
  """What one checkpoint of a train state (ShapeDtypeStructs) takes on disk,
  about: its arrays' bytes, with room for orbax's metadata and the data
  iterator's state."""
  state_bytes = sum(leaf.size * leaf.dtype.itemsize
                    for leaf in jax.tree.leaves(abstract_state))
  return int(state_bytes * _CHECKPOINT_MARGIN) + _CHECKPOINT_OVERHEAD_BYTES


def check_disk_space(workdir: str, abstract_state,
                     free_bytes: int | None = None) -> None:
  """Refuses to start a run whose workdir's disk cannot hold one more
  checkpoint (the next save would fail hours in). `free_bytes`: default the
  free space of the disk holding `workdir`."""
  if "://" in workdir:  # a bucket: no disk to measure
    return
  if free_bytes is None:
    existing = os.path.abspath(workdir)
    while not os.path.exists(existing):  # other hosts may not see it yet
      existing = os.path.dirname(existing)
    free_bytes = shutil.disk_usage(existing).free
  needed = checkpoint_bytes(abstract_state)
  if free_bytes < needed:
    raise WorkdirError(
        f"the disk of workdir {workdir} has {_size(free_bytes)} free, but one "
        f"checkpoint of this run takes about {_size(needed)}; free some space "
        "or pass a --workdir on a larger disk")


def _size(num_bytes: float) -> str:
  if num_bytes >= 2**30:
    return f"{num_bytes / 2**30:.2f} GiB"
  return f"{num_bytes / 2**20:.1f} MiB"
