"""Diverging runs: a non-finite step changes nothing, too many in a row stop the
run with one line, and a train state holding NaN or inf is never saved."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from configs import clip as clip_config
from unclip_jax.errors import Diverged, UserError
from unclip_jax.parallel.mesh import make_mesh
from unclip_jax.train import loop, optim
from unclip_jax.train import setup as setup_lib
from unclip_jax.train import state as state_lib
from unclip_jax.train import step as step_lib
from unclip_jax.train.metrics import read_metrics


def _regression_loss(params, batch, rng):
  del rng
  prediction = batch["x"] @ params["dense"]["kernel"] + params["dense"]["bias"]
  loss = jnp.mean((prediction - batch["y"]) ** 2)
  return loss, {"mse": loss}


def _assert_bits_equal(a, b):
  a, b = np.asarray(a), np.asarray(b)
  assert a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


def test_a_non_finite_batch_leaves_the_state_bit_identical():
  config = clip_config.get_config("tiny")  # AdamW, clipping, warmup, EMA
  tx = optim.make_optimizer(config.optim, config.total_steps)
  mesh = make_mesh((8, 1, 1))
  replicated = NamedSharding(mesh, PartitionSpec())
  rows = NamedSharding(mesh, PartitionSpec("data"))
  params = {"dense": {"kernel": jnp.full((4, 2), 0.1), "bias": jnp.zeros((2,))}}
  train_state = jax.device_put(state_lib.new_state(params, tx), replicated)
  step = step_lib.jit_train_step(
      _regression_loss, tx, config.optim.ema_decay,
      jax.tree.map(lambda _: replicated, train_state), {"x": rows, "y": rows},
      replicated)
  draw = np.random.default_rng(0)
  batch = {"x": draw.normal(size=(16, 4)).astype(np.float32),
           "y": draw.normal(size=(16, 2)).astype(np.float32)}
  rng = jax.random.key(0)
  for _ in range(3):  # past warmup: params, moments and EMA all moved
    train_state, metrics = step(train_state, batch, rng)
    assert float(metrics["train/skipped"]) == 0.0
  before = jax.device_get(train_state)  # the step donates its input

  poisoned = dict(batch, x=np.where(np.arange(16)[:, None] == 5, np.nan,
                                    batch["x"]).astype(np.float32))
  train_state, metrics = step(train_state, poisoned, rng)
  after = jax.device_get(train_state)

  assert float(metrics["train/skipped"]) == 1.0
  assert not np.isfinite(float(metrics["train/loss"]))
  assert int(after.step) == int(before.step) + 1
  for name in ("params", "opt_state", "ema_params"):
    jax.tree.map(_assert_bits_equal, getattr(after, name), getattr(before, name))


def test_count_skips_stops_at_the_step_the_limit_is_reached():
  streak = step_lib.count_skips(0, [0.0, 1.0, 1.0], first_step=1, limit=4)
  assert streak == 2  # carried into the next log window
  assert step_lib.count_skips(streak, [1.0, 0.0, 1.0], first_step=4,
                              limit=4) == 1  # a step taken resets it
  with pytest.raises(Diverged) as error:
    step_lib.count_skips(streak, [1.0, 1.0, 1.0], first_step=4, limit=4)
  assert "the 4 steps up to step 5" in str(error.value)
  assert step_lib.count_skips(0, [1.0] * 50, first_step=1, limit=0) == 50


def _config(tfds_dir):
  c = clip_config.get_config("tiny")
  c.data.data_dir = tfds_dir
  c.async_checkpointing = False
  c.eval_every = c.total_steps  # these runs stop before it
  return c


def _patch_setup(monkeypatch, change):
  """setup() as the loop calls it, with `change(run)` applied to its result."""
  real = setup_lib.setup

  def patched(*args, **kwargs):
    run = real(*args, **kwargs)
    change(run)
    return run

  monkeypatch.setattr(setup_lib, "setup", patched)


def _saved_steps(workdir):
  path = os.path.join(workdir, "checkpoints")
  return sorted(os.listdir(path)) if os.path.isdir(path) else []


def _one_line_user_error(error):
  message = str(error.value)
  # A UserError: cli.run prints it as one line and exits with code 2.
  assert isinstance(error.value, UserError) and "\n" not in message
  return message


def test_consecutive_skipped_steps_stop_the_run(tmp_path, tfds_dir, monkeypatch):
  def nan_images(run):
    to_global = run.global_batch
    run.global_batch = lambda local: to_global(
        dict(local, image=np.full_like(local["image"], np.nan)))

  _patch_setup(monkeypatch, nan_images)
  config = _config(tfds_dir)
  config.max_consecutive_skips = 2
  workdir = str(tmp_path / "run")
  with pytest.raises(Diverged) as error:
    loop.train(config, workdir)
  message = _one_line_user_error(error)
  assert "the 2 steps up to step 2" in message
  assert "lower --config.optim.lr" in message and "earlier checkpoint" in message
  # Seen at the first log line (step 3), before its checkpoint was written.
  assert read_metrics(workdir)[-1]["train/skipped"] == 1.0
  assert _saved_steps(workdir) == []


def test_a_state_holding_nan_or_inf_is_never_saved(tmp_path, tfds_dir,
                                                   monkeypatch):
  def overflowing_ema(run):
    real_step = run.step

    def step(train_state, batch, rng):  # an update that overflowed, loss finite
      train_state, metrics = real_step(train_state, batch, rng)
      return train_state.replace(ema_params=jax.tree.map(
          lambda x: x * jnp.inf, train_state.ema_params)), metrics

    run.step = step

  _patch_setup(monkeypatch, overflowing_ema)
  workdir = str(tmp_path / "run")
  with pytest.raises(Diverged) as error:
    loop.train(_config(tfds_dir), workdir)
  message = _one_line_user_error(error)
  assert message.startswith("refusing to save checkpoint 3: the train state "
                            "holds NaN or inf")
  assert read_metrics(workdir)[-1]["train/skipped"] == 0.0
  assert _saved_steps(workdir) == []
