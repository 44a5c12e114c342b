"""The sharded upsampler train step equals the 1-device step: degradation, low-res
noise and crops made inside the step do not depend on how the batch is split."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import upsampler as upsampler_config
from unclip_jax.parallel import partitioning
from unclip_jax.parallel.mesh import make_mesh
from unclip_jax.stages.upsampler import Upsampler, UpsamplerStage
from unclip_jax.train import optim, state
from unclip_jax.train.step import jit_train_step


def _stage():
  config = upsampler_config.get_config("tiny")
  stage = UpsamplerStage(config, workdir="unused")
  stage.upsampler = Upsampler(config)
  return stage


def _batch(config, size=16):
  side = config.data.resolution
  rng = np.random.default_rng(0)
  return {"image": rng.uniform(-1, 1, (size, side, side, 3)).astype(np.float32)}


def _initial_state(stage, tx):
  """Numpy-drawn params (nonzero everywhere, no init to compile per mesh)."""
  abstract = nn.unbox(jax.eval_shape(stage.init_params, jax.random.key(0)))
  rng = np.random.default_rng(1)
  params = jax.tree.map(
      lambda leaf: jnp.asarray(rng.normal(0, 0.1, leaf.shape), leaf.dtype), abstract)
  return state.new_state(params, tx)


def _two_steps(stage, batch, mesh_shape, devices):
  config = stage.config
  mesh = make_mesh(mesh_shape, devices=devices)
  rules = partitioning.rules_from_config(config.mesh.rules)
  tx = optim.make_optimizer(config.optim, config.total_steps)
  _, shardings = state.abstract_state(stage.init_params, tx, mesh, rules,
                                      jax.random.key(0))
  train_state = jax.device_put(_initial_state(stage, tx), shardings)
  batch_shardings = partitioning.shard_batch_tree(batch, mesh, rules)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    step = jit_train_step(stage.loss, tx, config.optim.ema_decay, shardings,
                          batch_shardings, partitioning.replicated(mesh))
    all_metrics = []
    for _ in range(2):
      train_state, metrics = step(train_state, batch, jax.random.key(1))
      all_metrics.append(metrics)
  return jax.device_get((train_state, all_metrics)), train_state


@pytest.fixture(scope="module")
def reference():
  stage = _stage()
  batch = _batch(stage.config)
  return stage, batch, _two_steps(stage, batch, (1, 1, 1), jax.devices()[:1])[0]


@pytest.mark.parametrize("mesh_shape", [(8, 1, 1), (2, 2, 2), (1, 4, 2)])
def test_sharded_step_matches_one_device(reference, mesh_shape):
  stage, batch, (ref_state, ref_metrics) = reference
  (got_state, got_metrics), live = _two_steps(stage, batch, mesh_shape, None)
  for ref, got in zip(ref_metrics, got_metrics):
    np.testing.assert_allclose(got["train/loss"], ref["train/loss"], rtol=1e-5)
    np.testing.assert_allclose(got["train/grad_norm"], ref["train/grad_norm"],
                               rtol=1e-4)
  jax.tree.map(lambda g, r: np.testing.assert_allclose(g, r, atol=1e-5),
               got_state.params, ref_state.params)
  if mesh_shape[1] * mesh_shape[2] > 1:
    sharded = [x for x in jax.tree.leaves(live.params)
               if not x.sharding.is_fully_replicated]
    assert sharded
