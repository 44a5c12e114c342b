"""A checkpoint saved on one mesh restores onto another with identical values,
each leaf placed as the new mesh's rules say."""
import flax.linen as nn
import jax
import numpy as np
import pytest

from configs import clip, prior
from unclip_jax.compile import stage_for_compile
from unclip_jax.parallel import partitioning
from unclip_jax.checkpoints import manager as checkpoint
from unclip_jax.parallel.mesh import make_mesh
from unclip_jax.train import optim, state


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
  """A prior's train state saved from a (1, 4, 2) mesh."""
  config = prior.get_config("tiny")
  config.model.num_heads = 4
  config.async_checkpointing = False
  stage = stage_for_compile(config, clip.get_config("tiny"))
  tx = optim.make_optimizer(config.optim, config.total_steps)
  rules = partitioning.rules_from_config(config.mesh.rules)
  draw = np.random.default_rng(0)
  params = jax.tree.map(lambda a: draw.normal(size=a.shape).astype(a.dtype),
                        nn.unbox(jax.eval_shape(stage.init_params,
                                                jax.random.key(0))))
  host_state = jax.device_get(state.new_state(params, tx))
  _, shardings = state.abstract_state(stage.init_params, tx,
                                      make_mesh((1, 4, 2)), rules,
                                      jax.random.key(0))
  workdir = str(tmp_path_factory.mktemp("run"))
  manager = checkpoint.make_manager(workdir, config)
  checkpoint.save(manager, 7, jax.device_put(host_state, shardings), None,
                  config, force=True)
  manager.wait_until_finished()
  return stage, tx, rules, manager, host_state


@pytest.mark.parametrize("mesh_shape", [(2, 2, 2), (8, 1, 1), (1, 8, 1)])
def test_restore_onto_another_mesh_gives_identical_values(saved, mesh_shape):
  stage, tx, rules, manager, host_state = saved
  target, shardings = state.abstract_state(
      stage.init_params, tx, make_mesh(mesh_shape), rules, jax.random.key(0))
  restored = checkpoint.restore(manager, 7, target)
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(restored),
               host_state)
  for leaf, sharding in zip(jax.tree.leaves(restored),
                            jax.tree.leaves(shardings)):
    assert leaf.sharding == sharding
