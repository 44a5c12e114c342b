"""From logical axis names to shardings on a mesh."""
from typing import Any, Sequence

import flax.linen as nn
import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

Rules = Sequence[tuple[str, Any]]


def rules_from_config(rules) -> tuple[tuple[str, Any], ...]:
  """Config rules (lists from JSON or tuples) -> flax logical axis rules."""
  out = []
  for logical, mesh_axes in rules:
    if isinstance(mesh_axes, list):
      mesh_axes = tuple(mesh_axes)
    out.append((str(logical), mesh_axes))
  return tuple(out)


def logical_shardings(abstract_tree: Any, mesh: Mesh, rules: Rules) -> Any:
  """Shardings for a tree of (possibly boxed) abstract values.

  Leaves boxed with `nn.LogicallyPartitioned` get the mesh axes their logical
  names map to; plain leaves are replicated.
  """
  logical_specs = nn.get_partition_spec(abstract_tree)
  return nn.logical_to_mesh_sharding(logical_specs, mesh, rules)


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: Mesh, rules: Rules, ndim: int) -> NamedSharding:
  """Sharding of a batch array: its leading axis is 'activation_batch'."""
  spec = nn.logical_to_mesh_axes(("activation_batch",) + (None,) * (ndim - 1),
                                 rules)
  return NamedSharding(mesh, spec)


def shard_batch_tree(tree: Any, mesh: Mesh, rules: Rules) -> Any:
  return jax.tree.map(lambda x: batch_sharding(mesh, rules, x.ndim), tree)
