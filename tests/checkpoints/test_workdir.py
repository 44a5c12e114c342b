"""StageWorkdir: only the EMA params of a checkpoint, any mesh, one-line errors,
and a checkpoint of another parameter layout refused."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from configs import clip as clip_config
from unclip_jax.errors import WorkdirError
from unclip_jax.parallel.mesh import make_mesh
from unclip_jax.checkpoints import manager as checkpoint
from unclip_jax.checkpoints.workdir import StageWorkdir
from unclip_jax.train.state import TrainState


def _load(workdir, stage, step=None, sharding=None, expected=None):
  """(config, EMA params, step), as generators.load reads them."""
  with StageWorkdir(workdir, stage) as reader:
    step = reader.step(step)
    return (reader.config,
            reader.restore_ema_params(step, sharding, expected=expected), step)


def _write_run(workdir, stage="clip", steps=(1, 2)):
  """A workdir as the loop leaves it, with a state sharded over a (2, 2, 2) mesh."""
  config = clip_config.get_config("tiny")
  config.stage = stage
  config.async_checkpointing = False
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, "config.json"), "w") as f:
    f.write(config.to_json())
  mesh = make_mesh((2, 2, 2))
  split = NamedSharding(mesh, PartitionSpec("fsdp", "tensor"))
  manager = checkpoint.make_manager(workdir, config)
  for step in steps:
    params = {"dense": {"kernel": jax.device_put(jnp.full((8, 6), float(step)), split)}}
    ema = {"dense": {"kernel": jax.device_put(jnp.full((8, 6), step + 0.5), split)}}
    opt_state = {"mu": jax.device_put(jnp.zeros((8, 6)), split)}
    state = TrainState(step=jnp.asarray(step, jnp.int32), params=params,
                       opt_state=opt_state, ema_params=ema)
    checkpoint.save(manager, step, state, None, config)
  manager.wait_until_finished()
  manager.close()
  return config


def test_restores_only_ema_params_replicated(tmp_path):
  workdir = str(tmp_path / "run")
  _write_run(workdir)
  config, ema, step = _load(workdir, "clip")
  assert config.stage == "clip" and step == 2
  assert set(ema) == {"dense"} and set(ema["dense"]) == {"kernel"}
  kernel = ema["dense"]["kernel"]
  np.testing.assert_array_equal(kernel, np.full((8, 6), 2.5))
  assert kernel.sharding.is_fully_replicated
  assert {d for d in kernel.sharding.device_set} == set(jax.local_devices())

  _, earlier, step = _load(workdir, "clip", step=1)
  assert step == 1
  np.testing.assert_array_equal(earlier["dense"]["kernel"], np.full((8, 6), 1.5))


def test_restores_onto_a_given_sharding(tmp_path):
  workdir = str(tmp_path / "run")
  _write_run(workdir)
  sharding = NamedSharding(make_mesh((8, 1, 1)), PartitionSpec("data"))
  _, ema, _ = _load(workdir, "clip", sharding=sharding)
  assert ema["dense"]["kernel"].sharding == sharding
  np.testing.assert_array_equal(ema["dense"]["kernel"], np.full((8, 6), 2.5))
  per_leaf = {"dense": {"kernel": NamedSharding(make_mesh((2, 2, 2)),
                                                PartitionSpec(None, "tensor"))}}
  _, ema, _ = _load(workdir, "clip", sharding=per_leaf)
  assert ema["dense"]["kernel"].sharding == per_leaf["dense"]["kernel"]


def _one_line(error):
  message = str(error.value)
  assert "\n" not in message
  return message


def test_wrong_stage_names_both(tmp_path):
  workdir = str(tmp_path / "run")
  _write_run(workdir, stage="prior", steps=(1,))
  with pytest.raises(WorkdirError) as error:
    _load(workdir, "clip")
  message = _one_line(error)
  assert "'prior'" in message and "'clip'" in message


def test_no_checkpoint_says_how_to_train(tmp_path):
  workdir = str(tmp_path / "run")
  os.makedirs(workdir)
  with open(os.path.join(workdir, "config.json"), "w") as f:
    json.dump({"stage": "clip"}, f)
  with pytest.raises(WorkdirError) as error:
    _load(workdir, "clip")
  message = _one_line(error)
  assert "has no checkpoint" in message
  assert f"python -m unclip_jax.train --config configs/clip.py:demo --workdir {workdir}" \
      in message


def test_not_a_workdir(tmp_path):
  with pytest.raises(WorkdirError) as error:
    _load(str(tmp_path), "clip")
  assert "no config.json" in _one_line(error)


def test_missing_step(tmp_path):
  workdir = str(tmp_path / "run")
  _write_run(workdir, steps=(1,))
  with pytest.raises(WorkdirError) as error:
    _load(workdir, "clip", step=7)
  assert "no checkpoint at step 7" in _one_line(error)


def test_a_checkpoint_of_another_layout_is_refused_in_one_line(tmp_path):
  workdir = str(tmp_path / "run")
  _write_run(workdir, steps=(1,))
  renamed = {"dense": {"weight": jax.ShapeDtypeStruct((8, 6), jnp.float32)}}
  with pytest.raises(WorkdirError) as error:
    _load(workdir, "clip", expected=renamed)
  assert "predates" in _one_line(error)
  reshaped = {"dense": {"kernel": jax.ShapeDtypeStruct((8, 4), jnp.float32)}}
  with pytest.raises(WorkdirError) as error:
    _load(workdir, "clip", expected=reshaped)
  assert "has shape [8, 6] in checkpoint but [8, 4]" in _one_line(error)
