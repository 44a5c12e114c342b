"""The trainer loop end to end: workdir contract, and kill + resume."""
import json
import os

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from configs import clip as clip_config
from unclip_jax.checkpoints import manager as checkpoint
from unclip_jax.train import loop


class Killed(Exception):
  pass


def _config(tfds_dir):
  c = clip_config.get_config("tiny")
  c.data.data_dir = tfds_dir
  c.async_checkpointing = False
  return c


def _final_params(workdir):
  manager = ocp.CheckpointManager(os.path.join(workdir, "checkpoints"))
  step = manager.latest_step()
  restored = manager.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore()))
  return step, restored["state"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, tfds_dir):
  workdir = str(tmp_path_factory.mktemp("uninterrupted"))
  metrics = loop.train(_config(tfds_dir), workdir)
  return workdir, metrics


def test_workdir_contract(uninterrupted):
  workdir, metrics = uninterrupted
  assert {"config.json", "checkpoints", "metrics.jsonl",
          "tokenizer.model"} <= set(os.listdir(workdir))
  with open(os.path.join(workdir, "config.json")) as f:
    assert json.load(f)["stage"] == "clip"
  rows = [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl"))]
  assert all("step" in row for row in rows)
  names = set().union(*rows)
  assert {"train/loss", "eval/i2t_top1", "eval/t2i_top1",
          "perf/examples_per_sec", "perf/mfu"} <= names
  assert 0.0 <= metrics["eval/i2t_top1"] <= 1.0


def test_kill_and_resume_matches_uninterrupted(uninterrupted, tfds_dir,
                                               tmp_path, monkeypatch):
  workdir = str(tmp_path / "resumed")
  real_save = checkpoint.save

  def save_then_die(manager, step, *args, **kwargs):
    real_save(manager, step, *args, **kwargs)
    manager.wait_until_finished()
    if step == 3:
      raise Killed()

  monkeypatch.setattr(checkpoint, "save", save_then_die)
  with pytest.raises(Killed):
    loop.train(_config(tfds_dir), workdir)
  monkeypatch.setattr(checkpoint, "save", real_save)
  loop.train(_config(tfds_dir), workdir)  # the same command again

  step, resumed = _final_params(workdir)
  ref_step, reference = _final_params(uninterrupted[0])
  assert step == ref_step == 6
  jax.tree.map(np.testing.assert_array_equal, resumed, reference)
