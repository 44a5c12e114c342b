"""From a built stage and a mesh to a compiled train step, written once.

mesh -> rules -> optimizer -> sharded abstract state -> batch shardings ->
compiled step. The trainer loop, `python -m unclip_jax.compile` (a TPU slice's
compile-only devices), the benchmarks and the sharding tests all go through
`setup`: nothing in it depends on which stage it is.
"""
import dataclasses
import logging
from typing import Any, Callable

import jax
from jax.sharding import Mesh

from unclip_jax.parallel import coverage, partitioning
from unclip_jax.train import optim, state
from unclip_jax.train import step as step_lib

log = logging.getLogger(__name__)


@dataclasses.dataclass
class TrainSetup:
  """Everything the loop needs around one compiled step."""
  mesh: Mesh
  rules: tuple
  tx: Any  # optax.GradientTransformation
  abstract_state: Any  # ShapeDtypeStructs carrying their shardings
  state_shardings: Any
  abstract_batch: dict[str, jax.ShapeDtypeStruct]  # global, with shardings
  batch_shardings: Any
  step: Callable  # compiled: (state, global batch, rng) -> (state, metrics)
  flops_per_step: float  # matmul + conv FLOPs of one step on all devices
  _init_params: Callable = dataclasses.field(repr=False, default=None)

  def init_state(self, rng: jax.Array) -> state.TrainState:
    """A fresh train state, initialised directly sharded."""
    train_state, _ = state.sharded_init(self._init_params, self.tx, self.mesh,
                                        self.rules, rng)
    return train_state

  def global_batch(self, local_batch: Any) -> Any:
    """This process's rows of a batch -> global arrays on the mesh."""
    return jax.tree.map(lambda x, s: jax.make_array_from_process_local_data(s, x),
                        local_batch, self.batch_shardings)


def check_sharding(params: Any, mesh: Mesh, rules, config) -> None:
  """Refuses (ConfigError) an FSDP mesh that would leave too many parameter
  bytes whole on every device; logs the per-device parameter memory."""
  coverage.check_coverage(params, mesh, rules, config.mesh.get(
      "max_replicated_fraction", coverage.MAX_REPLICATED_FRACTION))
  found = coverage.summary(params, mesh, rules)
  log.info("mesh %s: %.3g params (%.1f MiB), %.1f MiB per device, %.1f%% "
           "replicated", dict(mesh.shape), found["params"],
           found["param_bytes"] / 2**20,
           found["param_bytes_per_device"] / 2**20,
           100 * found["replicated_fraction"])


def setup(config, stage, mesh: Mesh) -> TrainSetup:
  """Compiles `stage`'s train step (after `stage.build`) for `mesh`, on abstract
  values: nothing is allocated, so it serves compile-only devices too."""
  rules = partitioning.rules_from_config(config.mesh.rules)
  tx = optim.make_optimizer(config.optim, config.total_steps)
  rng = jax.random.key(0)  # shapes only: no value is drawn from it
  check_sharding(jax.eval_shape(stage.init_params, rng), mesh, rules, config)
  abstract_state, state_shardings = state.abstract_state(
      stage.init_params, tx, mesh, rules, rng)
  batch = stage.abstract_batch()
  batch_shardings = partitioning.shard_batch_tree(batch, mesh, rules)
  abstract_batch = jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
      batch, batch_shardings)
  abstract_rng = jax.ShapeDtypeStruct(rng.shape, rng.dtype,
                                      sharding=partitioning.replicated(mesh))
  compiled, flops = step_lib.compile_train_step(
      stage.loss, tx, config, mesh, rules, state_shardings, batch_shardings,
      abstract_state, abstract_batch, abstract_rng)
  return TrainSetup(mesh=mesh, rules=rules, tx=tx, abstract_state=abstract_state,
                    state_shardings=state_shardings, abstract_batch=abstract_batch,
                    batch_shardings=batch_shardings, step=compiled,
                    flops_per_step=flops, _init_params=stage.init_params)


def check_batch(local_batch: dict, abstract_batch: dict, num_processes: int) -> None:
  """The data pipeline delivers what the step was compiled for: same fields,
  dtypes and per-process shapes (a stage's `abstract_batch` that drifted from
  its data is a bug, caught at the first step)."""
  if set(local_batch) != set(abstract_batch):
    raise ValueError(f"the data pipeline delivers fields {sorted(local_batch)}, "
                     f"the stage declares {sorted(abstract_batch)}")
  for name, expected in abstract_batch.items():
    got = local_batch[name]
    shape = (expected.shape[0] // num_processes,) + tuple(expected.shape[1:])
    if tuple(got.shape) != shape or got.dtype != expected.dtype:
      raise ValueError(f"batch field {name!r} is {got.dtype}{list(got.shape)} "
                       f"per process; the stage declares {expected.dtype}"
                       f"{list(shape)}")
