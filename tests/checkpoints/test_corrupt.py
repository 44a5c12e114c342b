"""Damaged checkpoints (truncated, missing or garbled files, an unfinished write)
are named in one line and passed over for the newest one that reads, by the
trainer and by the readers; keep-N never deletes a checkpoint before its
successor is complete."""
import glob
import logging
import os
import re
import shutil
import threading

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from configs import clip as clip_config
from configs import upsampler as upsampler_config
from unclip_jax import generators
from unclip_jax.checkpoints import manager as checkpoint
from unclip_jax.checkpoints.workdir import StageWorkdir
from unclip_jax.errors import DamagedCheckpoint, WorkdirError
from unclip_jax.generators.base import abstract_params
from unclip_jax.train import loop
from unclip_jax.train.state import TrainState

# After a failed read, tensorstore callbacks still in flight find orbax's event
# loop closed and print "Event loop is closed" as unraisable: orbax's noise.
pytestmark = pytest.mark.filterwarnings(
    "ignore::pytest.PytestUnraisableExceptionWarning")


def _clip_config(tfds_dir):
  # test_resume.py's config: within a session its programs come from the cache.
  c = clip_config.get_config("tiny")
  c.data.data_dir = tfds_dir
  c.async_checkpointing = False
  return c


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tfds_dir):
  """A tiny CLIP run with checkpoints at steps 3 and 6; tests damage copies."""
  workdir = str(tmp_path_factory.mktemp("trained"))
  loop.train(_clip_config(tfds_dir), workdir)
  return workdir


@pytest.fixture
def warnings_logged():
  """Messages our code logs at WARNING, through a handler of its own (the CLI's
  logging set-up stops propagation to pytest's)."""
  records = []
  handler = logging.Handler(logging.WARNING)
  handler.emit = records.append
  logger = logging.getLogger("unclip_jax")
  logger.addHandler(handler)
  yield records
  logger.removeHandler(handler)


def _copy(workdir, tmp_path):
  copy = str(tmp_path / "run")
  shutil.copytree(workdir, copy)
  return copy


def _step_dir(workdir, step):
  return os.path.join(workdir, "checkpoints", str(step))


def _array_files(step_dir):
  return glob.glob(os.path.join(step_dir, "state", "**", "d", "*"), recursive=True)


def _truncate(path):
  with open(path, "r+b") as f:
    f.truncate(os.path.getsize(path) // 2)


def _garble(path):
  with open(path, "r+b") as f:
    f.write(np.random.default_rng(0).bytes(os.path.getsize(path)))


# The file a failed array read names, and the array it was reading.
ARRAY_FILE = r"state/(ocdbt\.process_\d+/)?d/[0-9a-f]+ \(reading ema_params\."
# name -> (damage done to a step directory, what the one log line names)
DAMAGES = {
    "truncated_array_data": (lambda d: [_truncate(p) for p in _array_files(d)],
                             ARRAY_FILE + r".*OUT_OF_RANGE"),
    "missing_array_data": (lambda d: [os.remove(p) for p in _array_files(d)],
                           ARRAY_FILE + r".*NOT_FOUND"),
    "garbled_array_data": (lambda d: [_garble(p) for p in _array_files(d)],
                           ARRAY_FILE + r".*DATA_LOSS"),
    "garbled_metadata": (lambda d: _garble(os.path.join(d, "state", "_METADATA")),
                         r"state/_METADATA: not valid JSON"),
    "unfinished_write": (lambda d: os.remove(os.path.join(d, "commit_success.txt")),
                         r"commit_success\.txt: missing"),
}


def _one_line(messages):
  assert len(messages) == 1, messages
  assert "\n" not in messages[0]
  return messages[0]


@pytest.mark.parametrize("damage", sorted(DAMAGES))
def test_readers_pass_over_a_damaged_newest_checkpoint(trained, tmp_path, damage,
                                                       warnings_logged):
  workdir = _copy(trained, tmp_path)
  apply, named = DAMAGES[damage]
  apply(_step_dir(workdir, 6))
  with StageWorkdir(trained, "clip") as pristine:
    expected = pristine.restore_ema_params(3)
  with StageWorkdir(workdir, "clip") as reader:
    step, params = reader.restore_newest_ema_params()
    with pytest.raises(DamagedCheckpoint) as asked_for:  # asked for by number
      reader.restore_ema_params(6)
  assert step == 3
  jax.tree.map(np.testing.assert_array_equal, params, expected)
  line = _one_line([r.getMessage() for r in warnings_logged])
  assert re.search(r"checkpoint 6 is damaged \(" + named, line), line
  assert line.endswith("using step 3")
  message = _one_line([str(asked_for.value)])
  assert re.search(r"checkpoint 6 is damaged \(" + named, message), message
  assert message.endswith(f"move {_step_dir(workdir, 6)} aside to use an older "
                          "checkpoint")


def test_generators_load_takes_the_newest_checkpoint_that_reads(tmp_path,
                                                                warnings_logged):
  config = upsampler_config.get_config("tiny")
  config.async_checkpointing = False
  workdir = str(tmp_path / "upsampler")
  os.makedirs(workdir)
  with open(os.path.join(workdir, "config.json"), "w") as f:
    f.write(config.to_json())
  generator = generators.generator_class("upsampler").from_config(config)
  shapes = abstract_params(generator.init_params)
  manager = checkpoint.make_manager(workdir, config)
  for step in (1, 2):
    params = jax.tree.map(lambda s: jnp.full(s.shape, step, s.dtype), shapes)
    checkpoint.save(manager, step, TrainState(
        step=jnp.asarray(step, jnp.int32), params=params,
        opt_state={"count": jnp.zeros((), jnp.int32)}, ema_params=params),
                    None, config)
  manager.close()
  DAMAGES["garbled_array_data"][0](_step_dir(workdir, 2))

  loaded = generators.load(workdir, "upsampler")
  assert loaded.step == 1
  assert all(np.all(np.asarray(x) == 1) for x in jax.tree.leaves(loaded.params))
  line = _one_line([r.getMessage() for r in warnings_logged])
  assert re.search(r"checkpoint 2 is damaged \(" + ARRAY_FILE, line), line


def test_no_readable_checkpoint_is_one_line_naming_the_steps(trained, tmp_path,
                                                            tfds_dir):
  workdir = _copy(trained, tmp_path)
  DAMAGES["unfinished_write"][0](_step_dir(workdir, 6))
  DAMAGES["garbled_array_data"][0](_step_dir(workdir, 3))
  with pytest.raises(WorkdirError) as sampling, \
      StageWorkdir(workdir, "clip") as reader:
    reader.restore_newest_ema_params()
  with pytest.raises(WorkdirError) as training:
    loop.train(_clip_config(tfds_dir), workdir)
  for error in (sampling, training):
    message = _one_line([str(error.value)])
    assert "tried steps [6, 3]" in message and "move them aside" in message
    assert "commit_success.txt: missing" in message
  # Nothing is moved when nothing restores: the user decides.
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["3", "6"]


def _final_state(workdir):
  manager = ocp.CheckpointManager(os.path.join(workdir, "checkpoints"))
  restored = manager.restore(6, args=ocp.args.Composite(
      state=ocp.args.StandardRestore()))
  return restored["state"]


def test_training_resumes_from_the_newest_checkpoint_that_restores(
    trained, tmp_path, tfds_dir, warnings_logged):
  workdir = _copy(trained, tmp_path)
  DAMAGES["unfinished_write"][0](_step_dir(workdir, 6))
  loop.train(_clip_config(tfds_dir), workdir)  # the same command again

  line = _one_line([r.getMessage() for r in warnings_logged])
  moved = os.path.join(workdir, checkpoint.DAMAGED_DIRNAME, "6")
  assert "checkpoint 6 is damaged (commit_success.txt: missing" in line, line
  assert moved in line and os.path.isdir(moved)
  # Steps 4-6 trained again from step 3 give the uninterrupted run's state.
  jax.tree.map(np.testing.assert_array_equal, _final_state(workdir),
               _final_state(trained))


class _Gate:
  """A commit future that completes, or fails, when the test says."""

  def __init__(self, fail=False):
    self.opened = threading.Event()
    self.fail = fail

  def result(self, timeout=None):
    assert self.opened.wait(timeout=60)
    if self.fail:
      raise OSError("disk full (injected)")

  def cancel(self):
    pass


def _gate_next_save(monkeypatch, gate):
  real = ocp.JsonCheckpointHandler.async_save

  async def gated(self, *args, **kwargs):
    return (await real(self, *args, **kwargs) or []) + [gate]

  monkeypatch.setattr(ocp.JsonCheckpointHandler, "async_save", gated)


def _small_state(value):
  params = {"dense": {"kernel": jnp.full((64, 64), value)}}
  return TrainState(step=jnp.asarray(int(value), jnp.int32), params=params,
                    opt_state={"mu": params}, ema_params=params)


def _restorable(workdir, step):
  path = _step_dir(workdir, step)
  if checkpoint.find_damage(path, (checkpoint.STATE, checkpoint.CONFIG)):
    return False
  with StageWorkdir(workdir, "clip") as reader:
    kernel = reader.restore_ema_params(step)["dense"]["kernel"]
  return bool(np.all(np.asarray(kernel) == step))


def _keep_one_manager(workdir, async_checkpointing):
  config = clip_config.get_config("tiny")
  config.keep_checkpoints, config.async_checkpointing = 1, async_checkpointing
  os.makedirs(workdir)
  with open(os.path.join(workdir, "config.json"), "w") as f:
    f.write(config.to_json())
  manager = checkpoint.make_manager(workdir, config)
  checkpoint.save(manager, 1, _small_state(1.0), None, config)
  manager.wait_until_finished()
  return manager, config


def test_keep_deletes_a_checkpoint_only_after_its_successor_is_complete(
    tmp_path, monkeypatch):
  workdir = str(tmp_path / "run")
  manager, config = _keep_one_manager(workdir, async_checkpointing=True)

  in_flight = _Gate()
  _gate_next_save(monkeypatch, in_flight)
  checkpoint.save(manager, 2, _small_state(2.0), None, config)
  assert not os.path.isdir(_step_dir(workdir, 2))  # still being written
  assert _restorable(workdir, 1)
  in_flight.opened.set()
  manager.wait_until_finished()
  assert _restorable(workdir, 2) and not os.path.exists(_step_dir(workdir, 1))

  failing = _Gate(fail=True)
  _gate_next_save(monkeypatch, failing)
  checkpoint.save(manager, 3, _small_state(3.0), None, config)
  failing.opened.set()
  with pytest.raises(OSError, match="injected"):
    manager.wait_until_finished()
  assert not os.path.isdir(_step_dir(workdir, 3))
  assert _restorable(workdir, 2)  # keep=1 did not delete it for a failed save
  manager.close()


def test_keep_spares_the_older_checkpoint_when_a_blocking_save_fails(
    tmp_path, monkeypatch):
  workdir = str(tmp_path / "run")
  manager, config = _keep_one_manager(workdir, async_checkpointing=False)
  failing = _Gate(fail=True)
  failing.opened.set()
  _gate_next_save(monkeypatch, failing)
  with pytest.raises(OSError, match="injected"):
    checkpoint.save(manager, 2, _small_state(2.0), None, config)
  assert not os.path.isdir(_step_dir(workdir, 2))
  assert _restorable(workdir, 1)
  manager.close()


def test_another_layout_is_not_damage_and_moves_nothing(tmp_path):
  workdir = str(tmp_path / "run")
  manager, config = _keep_one_manager(workdir, async_checkpointing=False)
  narrower = _small_state(2.0).replace(
      ema_params={"dense": {"kernel": jnp.zeros((64, 32))}})
  other = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                                      sharding=x.sharding),
                       narrower)
  with pytest.raises(WorkdirError) as error:
    checkpoint.restore_newest(manager, other)
  message = _one_line([str(error.value)])
  assert not isinstance(error.value, DamagedCheckpoint)
  assert "does not match this config or version" in message
  assert "(64, 64) in the checkpoint, (64, 32) now" in message
  assert os.listdir(os.path.join(workdir, "checkpoints")) == ["1"]
  manager.close()
