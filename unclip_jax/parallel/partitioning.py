"""From logical axis names to shardings on a mesh.

Parameters are placed by `logical_shardings`, which reads the rules as MaxText
does (a logical name may have several rules: the first that fits wins) and also
knows the array's shape: a mesh axis is taken only if it is larger than 1, not
already used by another dimension of the same array, and divides the
dimension. So `('mlp', 'tensor'), ('mlp', 'fsdp')` shards an MLP bias over
'tensor' when there is tensor parallelism and over 'fsdp' when there is not,
and a width no mesh axis divides stays whole instead of failing to compile.
Activations are constrained inside the models through flax's own resolution
(`nn.logical_axis_rules`), which takes the first free rule.
"""
import math
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


def _candidates(logical: str | None, rules: Rules) -> list[tuple[str, ...]]:
  """The mesh axes `logical` may take, in rule order (each a tuple)."""
  if logical is None:
    return []
  found = []
  for name, mesh_axes in rules:
    if name != logical or mesh_axes is None:
      continue
    found.append((mesh_axes,) if isinstance(mesh_axes, str)
                 else tuple(mesh_axes))
  return found


def resolve_spec(names: Sequence[str | None], shape: Sequence[int],
                 mesh_shape: dict[str, int], rules: Rules) -> PartitionSpec:
  """The PartitionSpec for an array of `shape` with logical axis `names`.

  Each dimension, left to right, takes its first rule whose mesh axes (size-1
  axes dropped) are unused in this array and divide the dimension.
  """
  used: set[str] = set()
  spec = []
  for name, size in zip(names, shape):
    chosen = None
    for mesh_axes in _candidates(name, rules):
      axes = tuple(a for a in mesh_axes if mesh_shape[a] > 1)
      if (axes and not used.intersection(axes)
          and size % math.prod(mesh_shape[a] for a in axes) == 0):
        chosen = axes[0] if len(axes) == 1 else axes
        used.update(axes)
        break
    spec.append(chosen)
  return PartitionSpec(*spec)


def _is_boxed(x) -> bool:
  return isinstance(x, nn.LogicallyPartitioned)


def logical_specs(abstract_tree: Any, mesh: Mesh, rules: Rules) -> Any:
  """PartitionSpecs for a tree of (possibly boxed) abstract values; plain
  leaves are replicated."""
  mesh_shape = dict(mesh.shape)

  def spec(leaf):
    if _is_boxed(leaf):
      return resolve_spec(leaf.names, leaf.value.shape, mesh_shape, rules)
    return PartitionSpec()
  return jax.tree.map(spec, abstract_tree, is_leaf=_is_boxed)


def logical_shardings(abstract_tree: Any, mesh: Mesh, rules: Rules) -> Any:
  """NamedShardings for a tree of (possibly boxed) abstract values."""
  return jax.tree.map(lambda s: NamedSharding(mesh, s),
                      logical_specs(abstract_tree, mesh, rules),
                      is_leaf=lambda x: isinstance(x, PartitionSpec))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: Mesh, rules: Rules, ndim: int) -> NamedSharding:
  """Sharding of a batch array: its leading axis is 'activation_batch'."""
  spec = nn.logical_to_mesh_axes(("activation_batch",) + (None,) * (ndim - 1),
                                 rules)
  return NamedSharding(mesh, spec)


def shard_batch_tree(tree: Any, mesh: Mesh, rules: Rules) -> Any:
  return jax.tree.map(lambda x: batch_sharding(mesh, rules, x.ndim), tree)


def abstract_global_batch(local_batch: Any, mesh: Mesh, rules: Rules,
                          num_processes: int | None = None) -> tuple[Any, Any]:
  """(global ShapeDtypeStructs, shardings) for a host-local batch: every
  process holds `1 / num_processes` of the rows (default: jax's count)."""
  scale = jax.process_count() if num_processes is None else num_processes
  shardings = shard_batch_tree(local_batch, mesh, rules)
  abstract = jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct((x.shape[0] * scale,) + x.shape[1:],
                                        x.dtype, sharding=s),
      local_batch, shardings)
  return abstract, shardings
