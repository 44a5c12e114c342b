"""Sharding coverage: how many parameter bytes each device holds, and a start-up
check that refuses FSDP runs which would replicate much of the model.

Works on abstract params (`jax.eval_shape(init_params, rng)`, boxed with
logical axis names), so it allocates nothing and runs for paper-size models on
any host.
"""
import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, PartitionSpec

from unclip_jax.errors import ConfigError
from unclip_jax.parallel import partitioning
from unclip_jax.parallel.axes import CONV_IN, EMBED, LAYERS

# MaxText's default: an FSDP run may leave at most 2% of parameter bytes whole.
MAX_REPLICATED_FRACTION = 0.02


@dataclasses.dataclass(frozen=True)
class ParamPlacement:
  path: str  # e.g. "vision/transformer/blocks/mlp/fc_in/kernel"
  shape: tuple[int, ...]
  nbytes: int
  names: tuple[str | None, ...] | None  # logical axes; None = never named
  spec: PartitionSpec
  shards: int  # devices one copy is split over


def _path(key_path) -> str:
  return "/".join(str(getattr(k, "key", getattr(k, "idx", k)))
                  for k in key_path)


def placements(abstract_params: Any, mesh: Mesh, rules) -> list[ParamPlacement]:
  """Where every parameter goes on `mesh` under `rules`, largest first."""
  mesh_shape = dict(mesh.shape)
  is_boxed = lambda x: isinstance(x, nn.LogicallyPartitioned)
  found = []
  for key_path, leaf in jax.tree_util.tree_flatten_with_path(
      abstract_params, is_leaf=is_boxed)[0]:
    names, value = (tuple(leaf.names), leaf.value) if is_boxed(leaf) else (
        None, leaf)
    spec = (partitioning.resolve_spec(names, value.shape, mesh_shape, rules)
            if names is not None else PartitionSpec())
    axes = [a for entry in spec if entry is not None
            for a in ((entry,) if isinstance(entry, str) else entry)]
    found.append(ParamPlacement(
        path=_path(key_path), shape=tuple(value.shape),
        nbytes=math.prod(value.shape) * np.dtype(value.dtype).itemsize,
        names=names, spec=spec,
        shards=math.prod(mesh_shape[a] for a in axes)))
  return sorted(found, key=lambda p: -p.nbytes)


def summary(abstract_params: Any, mesh: Mesh, rules) -> dict[str, float]:
  """Parameter count and bytes, bytes per device, replicated byte fraction."""
  found = placements(abstract_params, mesh, rules)
  total = sum(p.nbytes for p in found)
  return {"params": sum(math.prod(p.shape) for p in found),
          "param_bytes": total,
          "param_bytes_per_device": sum(p.nbytes / p.shards for p in found),
          "replicated_fraction": sum(p.nbytes for p in found
                                     if p.shards == 1) / max(total, 1)}


def bytes_per_device(abstract_params: Any, mesh: Mesh, rules) -> float:
  """Parameter bytes one device holds (one copy of the params)."""
  return summary(abstract_params, mesh, rules)["param_bytes_per_device"]


def _suggestion(param: ParamPlacement, fsdp: int) -> str:
  if param.names is None:
    return ("declare it with logical axis names (nn.with_logical_partitioning) "
            "in its model")
  # FSDP belongs on the width (as in MaxText), else on the largest axis; never
  # on the scanned layers axis, which every step walks through in order.
  order = sorted(zip(param.names, param.shape), key=lambda named: (
      named[0] not in (EMBED, CONV_IN), -named[1]))
  for name, size in order:
    if name not in (None, LAYERS) and size % fsdp == 0:
      return f"add the rule ('{name}', 'fsdp') to mesh.rules"
  return (f"none of its axes {param.names} divides by fsdp={fsdp}; name an "
          "axis that does in its model, or change mesh.shape")


def check_coverage(abstract_params: Any, mesh: Mesh, rules,
                   max_fraction: float = MAX_REPLICATED_FRACTION) -> float:
  """Raises ConfigError when, with fsdp > 1, more than `max_fraction` of the
  parameter bytes would sit whole on every device. Returns the fraction."""
  found = placements(abstract_params, mesh, rules)
  total = sum(p.nbytes for p in found)
  whole = [p for p in found if p.shards == 1]
  fraction = sum(p.nbytes for p in whole) / max(total, 1)
  fsdp = dict(mesh.shape).get("fsdp", 1)
  if fsdp > 1 and fraction > max_fraction:
    largest = ", ".join(
        f"{p.path} {p.shape} axes {p.names} ({p.nbytes / 2**20:.1f} MiB)"
        for p in whole[:3])
    raise ConfigError(
        f"{fraction:.1%} of parameter bytes would be replicated on every "
        f"device with fsdp={fsdp} (limit {max_fraction:.0%}, "
        f"mesh.max_replicated_fraction); largest: {largest}; "
        f"{_suggestion(whole[0], fsdp)}")
  return fraction
