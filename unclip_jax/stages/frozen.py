"""Trained stages loaded from their workdirs, frozen, for the stages and samplers
after them; what a prior or decoder checks and records of the CLIP it reads.

`load_trained(workdir, stage)` reads a workdir's config and only the EMA params of one
of its checkpoints (no optimizer state is read). `FrozenClip` wraps a CLIP workdir: its
tokenizer, the CLIP module and jitted encoders, and a `fingerprint` naming the exact
checkpoint, which caches of CLIP outputs are keyed by.
"""
import functools
import hashlib
import json
import logging
import os
import shutil
from typing import Any, Sequence

import flax.linen as nn
import grain
import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from unclip_jax.data.sources import BUNDLED_BUILDERS
from unclip_jax.data.tokenizer import FILENAME as TOKENIZER_FILENAME
from unclip_jax.data.tokenizer import PAD_ID, Tokenizer
from unclip_jax.errors import ConfigError, WorkdirError
from unclip_jax.stages.clip import build_clip
from unclip_jax.train import checkpoint

log = logging.getLogger(__name__)

# What a prior or decoder was trained on: the CLIP's fingerprint and sizes (+ extras).
FROZEN_CLIP_FILENAME = "frozen_clip.json"
_CLIP_HELP = ("a CLIP workdir, trained with python -m unclip_jax.train --config "
              "configs/clip.py:demo --workdir DIR")
_TRAIN_COMMAND = ("python -m unclip_jax.train --config configs/{stage}.py:demo "
                  "--workdir {workdir}")


def read_config(workdir: str, expected_stage: str) -> ml_collections.ConfigDict:
  """workdir/config.json, checked to be a run of `expected_stage`."""
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    raise WorkdirError(
        f"{workdir} is not a {expected_stage} workdir (no config.json); train "
        f"it first with {_TRAIN_COMMAND.format(stage=expected_stage, workdir=workdir)}")
  with open(path) as f:
    config = ml_collections.ConfigDict(json.load(f))
  stage = config.get("stage")
  if stage != expected_stage:
    raise WorkdirError(f"{workdir} holds a {stage!r} run, not a {expected_stage!r} "
                       f"run; pass the {expected_stage} stage's workdir")
  return config


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
  clip_config = read_config(c.clip_workdir, "clip")
  latest_step(c.clip_workdir, "clip", c.get("clip_step"))
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


class _DropReadOnlyNotice(logging.Filter):
  """Orbax warns that a read-only manager's directory is read only, each time one
  is made: for frozen stages that is the point, not news."""

  def filter(self, record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith("Given directory is read only")


logging.getLogger("absl").addFilter(_DropReadOnlyNotice())


def _read_only_manager(workdir: str) -> ocp.CheckpointManager:
  # PyTreeCheckpointHandler (not the loop's StandardCheckpointHandler) because it can
  # restore a part of the saved tree; the other items are registered so orbax knows them.
  # Process-local: a frozen stage is read onto this host's devices, by whichever
  # processes need it (only process 0 builds an embedding cache), so orbax must
  # not wait for the others at its barriers.
  this_process = jax.process_index()
  local = ocp.options.MultiprocessingOptions(
      primary_host=this_process, active_processes={this_process},
      barrier_sync_key_prefix=f"read_only_process_{this_process}")
  return ocp.CheckpointManager(
      checkpoint.checkpoint_dir(workdir),
      options=ocp.CheckpointManagerOptions(read_only=True, create=False,
                                           save_interval_steps=0,
                                           multiprocessing_options=local),
      item_handlers={checkpoint.STATE: ocp.PyTreeCheckpointHandler(
                         multiprocessing_options=local),
                     checkpoint.DATA: grain.checkpoint.CheckpointHandler(),
                     checkpoint.CONFIG: ocp.JsonCheckpointHandler()})


def _checkpoint_step(manager, workdir: str, stage: str, step: int | None) -> int:
  steps = manager.all_steps() if os.path.isdir(checkpoint.checkpoint_dir(workdir)) else []
  if not steps:
    raise WorkdirError(
        f"{workdir} has no checkpoint; train it first with "
        f"{_TRAIN_COMMAND.format(stage=stage, workdir=workdir)}")
  if step is None:
    return max(steps)
  if step not in steps:
    raise WorkdirError(f"{workdir} has no checkpoint at step {step}; it has "
                       f"steps {sorted(steps)}")
  return step


LOCAL_AXIS = "batch"


def local_mesh() -> Mesh:
  """This host's devices on one LOCAL_AXIS: where frozen stages and samplers run,
  in any process, apart from the trainer's global mesh."""
  return Mesh(np.asarray(jax.local_devices()), (LOCAL_AXIS,))


def local_replicated_sharding() -> NamedSharding:
  """Every leaf whole on each of this host's devices (no cross-host collectives)."""
  return NamedSharding(local_mesh(), PartitionSpec())


def put_local_rows(array: Any) -> jax.Array:
  """numpy [B, ...] -> split over this host's devices along B; whole on each of
  them when B does not divide (a 3-row request on 8 devices)."""
  array = np.asarray(array)
  mesh = local_mesh()
  if len(array) % mesh.size:
    return jax.device_put(array, local_replicated_sharding())
  return jax.device_put(array, NamedSharding(mesh, PartitionSpec(LOCAL_AXIS)))


def restore_ema_params(workdir: str, step: int, sharding: Any = None) -> Any:
  """Only the `ema_params` subtree of checkpoint `step`, placed on `sharding`: one
  Sharding for every leaf, a pytree of them shaped like the params, or None
  (replicated on this host's devices)."""
  sharding = sharding or local_replicated_sharding()
  with _read_only_manager(workdir) as manager:
    saved = manager.item_metadata(step)[checkpoint.STATE]
    saved = getattr(saved, "tree", saved)["ema_params"]
    if isinstance(sharding, jax.sharding.Sharding):
      sharding = jax.tree.map(lambda _: sharding, saved)
    target = {"ema_params": jax.tree.map(
        lambda m, s: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=s),
        saved, sharding)}
    restore_args = jax.tree.map(
        lambda s: ocp.ArrayRestoreArgs(sharding=s.sharding), target)
    restored = manager.restore(step, args=ocp.args.Composite(**{
        checkpoint.STATE: ocp.args.PyTreeRestore(
            item=target, restore_args=restore_args, partial_restore=True)}))
  return restored[checkpoint.STATE]["ema_params"]


def latest_step(workdir: str, expected_stage: str, step: int | None = None) -> int:
  """The checkpoint step `load_trained` would read (WorkdirError if none)."""
  with _read_only_manager(workdir) as manager:
    return _checkpoint_step(manager, workdir, expected_stage, step)


def load_trained(workdir: str, expected_stage: str, step: int | None = None,
                 sharding: Any = None) -> tuple[ml_collections.ConfigDict, Any, int]:
  """(config, EMA params, step) of a trained stage: the latest checkpoint or `step`.

  Raises WorkdirError (one line) when the workdir is not a run of `expected_stage` or
  has no checkpoint. The params are restored onto `sharding` (see
  `restore_ema_params`; default: replicated on this host's devices), whatever mesh
  they were trained on.
  """
  config = read_config(workdir, expected_stage)
  step = latest_step(workdir, expected_stage, step)
  return config, restore_ema_params(workdir, step, sharding), step


def config_hash(config: ml_collections.ConfigDict) -> str:
  text = json.dumps(config.to_dict(), sort_keys=True, default=str)
  return hashlib.sha256(text.encode()).hexdigest()[:12]


class FrozenClip:
  """A trained CLIP, read from its workdir, with jitted encoders.

  The config, tokenizer and checkpoint step are read at once; the params only on the
  first encode, so code that needs just the `fingerprint` (a cache hit) never loads
  them. Encoders run on this host's devices: params replicated, the batch split over
  the devices when it divides evenly.
  """

  def __init__(self, workdir: str, step: int | None = None):
    self.workdir = os.path.abspath(workdir)
    self.config = read_config(self.workdir, "clip")
    with _read_only_manager(self.workdir) as manager:
      self.step = _checkpoint_step(manager, self.workdir, "clip", step)
      committed = manager.metadata(self.step).commit_timestamp_nsecs
    self.tokenizer = Tokenizer.load(
        os.path.join(self.workdir, TOKENIZER_FILENAME),
        self.config.tokenizer.context_length)
    self.model = build_clip(self.config)
    # Path + step + when that step was written + the config: a CLIP retrained in the
    # same workdir, even to the same step, gets a new fingerprint.
    self.fingerprint = (f"{self.workdir}@{self.step}:{committed}:"
                        f"{config_hash(self.config)}")

  @property
  def embed_dim(self) -> int:
    return self.config.model.embed_dim

  @property
  def text_width(self) -> int:
    return self.config.model.text_width

  @property
  def context_length(self) -> int:
    return self.config.tokenizer.context_length

  @property
  def resolution(self) -> int:
    return self.config.data.resolution

  @property
  def vocab_size(self) -> int:
    """Token ids a model reading this CLIP's tokens must embed: the tokenizer's
    configured vocabulary (an upper bound of the trained one)."""
    return int(self.config.tokenizer.vocab_size)

  @functools.cached_property
  def params(self) -> Any:
    log.info("loading CLIP step %d from %s", self.step, self.workdir)
    return restore_ema_params(self.workdir, self.step, local_replicated_sharding())

  def _jit_method(self, method: str):
    def apply(params, inputs):
      # No logical axis rules: a caller's mesh context (the trainer's) must not
      # constrain activations of a model whose params live on this host's devices.
      with nn.logical_axis_rules(()):
        return self.model.apply({"params": params}, inputs, method=method)
    jitted = jax.jit(apply)

    def on_this_host(params, inputs):
      # The trainer's mesh spans every process's devices; this runs on ours only.
      with jax.set_mesh(local_mesh()):
        return jitted(params, inputs)
    return on_this_host

  @functools.cached_property
  def _encode_text(self):
    return self._jit_method("encode_text")

  @functools.cached_property
  def _encode_image(self):
    return self._jit_method("encode_image")

  def tokenize(self, captions: list[str]) -> np.ndarray:
    """[N] captions -> int32 [N, context_length], right-padded."""
    return self.tokenizer.encode(list(captions))

  @staticmethod
  def text_mask(tokens) -> np.ndarray:
    """bool [N, context_length]: True at real tokens (the end token included)."""
    return np.asarray(tokens) != PAD_ID

  def encode_text(self, tokens) -> tuple[jax.Array, jax.Array]:
    """int32 [B, L] -> (z_t [B, embed_dim] unit-norm, token encodings
    [B, L, text_width]), float32."""
    return self._encode_text(self.params, put_local_rows(tokens))

  def encode_image(self, images) -> jax.Array:
    """float [B, H, W, 3] in [-1, 1] -> z_i [B, embed_dim] unit-norm float32."""
    return self._encode_image(self.params, put_local_rows(np.asarray(images, np.float32)))

  def __repr__(self) -> str:
    return f"FrozenClip({self.fingerprint})"


def record_frozen_clip(workdir: str, clip: FrozenClip, **extra) -> None:
  """Keeps with a prior's or decoder's run what it needs of its CLIP: the tokenizer
  (captions are read through it) and frozen_clip.json (fingerprint, sizes, `extra`).
  Process 0 writes; the JSON is replaced atomically."""
  if jax.process_index() != 0:
    return
  tokenizer_path = os.path.join(workdir, TOKENIZER_FILENAME)
  if not os.path.exists(tokenizer_path):
    shutil.copyfile(os.path.join(clip.workdir, TOKENIZER_FILENAME), tokenizer_path)
  info = {"fingerprint": clip.fingerprint, "workdir": clip.workdir, "step": clip.step,
          "embed_dim": clip.embed_dim, "text_width": clip.text_width,
          "vocab_size": clip.vocab_size, "context_length": clip.context_length,
          "resolution": clip.resolution, **extra}
  path = os.path.join(workdir, FROZEN_CLIP_FILENAME)
  with open(path + ".tmp", "w") as f:
    json.dump(info, f)
  os.replace(path + ".tmp", path)


def read_frozen_clip(workdir: str, stage: str) -> dict:
  """The frozen_clip.json a `stage` run (prior, decoder) wrote in `workdir`."""
  path = os.path.join(workdir, FROZEN_CLIP_FILENAME)
  if not os.path.exists(path):
    raise WorkdirError(f"{workdir} has no {FROZEN_CLIP_FILENAME}; it was not "
                       f"written by a {stage} run")
  with open(path) as f:
    return json.load(f)
