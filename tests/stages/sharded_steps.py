"""Shared by the stages' sharding tests: two train steps on a mesh, compared
with the same two steps on one device.

Meshes: pure data parallel, data x fsdp, all three axes, and fsdp x tensor.
"""
import flax.linen as nn
import jax
import numpy as np

from unclip_jax.parallel import distributed
from unclip_jax.parallel.mesh import make_mesh
from unclip_jax.train import optim, state
from unclip_jax.train.setup import setup

MESH_SHAPES = [(8, 1, 1), (2, 4, 1), (2, 2, 2), (1, 4, 2)]


def initial_state(stage):
  """A host copy of a train state with numpy-drawn params (nonzero everywhere).

  Each mesh gets this state placed by the params' logical axes; drawing with
  numpy avoids compiling the (slow on CPU) threefry init at all.
  """
  config = stage.config
  tx = optim.make_optimizer(config.optim, config.total_steps)
  abstract = nn.unbox(jax.eval_shape(stage.init_params, jax.random.key(0)))
  rng = np.random.default_rng(1)
  params = jax.tree.map(
      lambda leaf: np.asarray(rng.normal(0, 0.1, leaf.shape), leaf.dtype),
      abstract)
  return jax.device_get(state.new_state(params, tx))


def _process_rows(batch, mesh):
  """This process's share of a global batch's rows, as each host's data
  pipeline reads it: all of it on a mesh of this process's devices only."""
  processes = sorted({d.process_index for d in mesh.devices.flat})
  index = processes.index(jax.process_index())
  return jax.tree.map(lambda x: np.split(x, len(processes))[index], batch)


def two_steps(stage, batch, mesh_shape, initial, devices=None):
  """((host state, [metrics, metrics]), live state) after two steps.

  The global batch is assembled from each process's rows, as the loop does; with
  several processes every one must call this (the results are gathered)."""
  run = setup(stage.config, stage, make_mesh(mesh_shape, devices=devices))
  train_state = jax.device_put(initial, run.state_shardings)
  global_batch = run.global_batch(_process_rows(batch, run.mesh))
  all_metrics = []
  for _ in range(2):
    train_state, metrics = run.step(train_state, global_batch, jax.random.key(1))
    all_metrics.append(metrics)
  return distributed.to_host((train_state, all_metrics)), train_state


def reference_steps(stage, batch):
  """The initial state and two steps on one of this process's devices."""
  initial = initial_state(stage)
  result, _ = two_steps(stage, batch, (1, 1, 1), initial, jax.local_devices()[:1])
  return initial, result


def split_on(leaf, mesh_axis: str) -> bool:
  """Whether a live array is split over `mesh_axis`."""
  return any(axis == mesh_axis or (isinstance(axis, tuple) and mesh_axis in axis)
             for axis in leaf.sharding.spec)


def assert_steps_match(reference, got, live, mesh_shape, *, equal_keys=(),
                       atol=1e-5):
  """Loss, grad norm and params after two steps agree; the mesh was used:
  with fsdp or tensor > 1, every large param is split."""
  ref_state, ref_metrics = reference
  got_state, got_metrics = got
  for ref, new in zip(ref_metrics, got_metrics):
    for key in equal_keys:  # e.g. rng-drawn drop counts: independent of mesh
      assert new[key] == ref[key], key
    np.testing.assert_allclose(new["train/loss"], ref["train/loss"],
                               rtol=1e-5)
    np.testing.assert_allclose(new["train/grad_norm"],
                               ref["train/grad_norm"], rtol=1e-4)
  jax.tree.map(lambda g, r: np.testing.assert_allclose(g, r, atol=atol),
               got_state.params, ref_state.params)
  if mesh_shape[1] * mesh_shape[2] > 1:  # fsdp or tensor: big params split
    whole = [x.shape for x in jax.tree.leaves(live.params)
             if x.size >= 1024 and x.sharding.is_fully_replicated]
    assert not whole, whole
