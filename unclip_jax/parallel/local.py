"""This host's devices, apart from the trainer's global mesh: where frozen stages
and samplers run, in any process, and how rows are batched over them.

`map_batches` runs a compiled function over any number of rows in fixed-size
chunks (the last padded by repeating its final row, the padding dropped from
the outputs), so one compiled shape serves every call; with `split=True` each
chunk is split over this host's devices along its rows.
"""
from typing import Any, Callable

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from unclip_jax.parallel import distributed

LOCAL_AXIS = "batch"


def local_mesh() -> Mesh:
  """This host's devices on one LOCAL_AXIS (no cross-host collectives)."""
  return Mesh(np.asarray(jax.local_devices()), (LOCAL_AXIS,))


def local_replicated_sharding() -> NamedSharding:
  """Every leaf whole on each of this host's devices."""
  return NamedSharding(local_mesh(), PartitionSpec())


def put_local_rows(array: Any) -> jax.Array:
  """numpy [B, ...] -> split over this host's devices along B; whole on each of
  them when B does not divide (a 3-row request on 8 devices)."""
  array = np.asarray(array)
  mesh = local_mesh()
  if len(array) % mesh.size:
    return jax.device_put(array, local_replicated_sharding())
  return jax.device_put(array, NamedSharding(mesh, PartitionSpec(LOCAL_AXIS)))


def chunk_size(rows: int, max_batch: int) -> int:
  """Rows per compiled call for a request of `rows`: at most `max_batch`,
  rounded up to a multiple of this host's device count (so chunks split)."""
  devices = jax.local_device_count()
  rows = min(rows, max(max_batch, 1))
  return -(-rows // devices) * devices


def map_batches(fn: Callable[[Any, int], Any], arrays: dict[str, np.ndarray],
                batch_size: int, *, split: bool = False) -> Any:
  """fn(chunk, first row) over same-length numpy `arrays` [N, ...] in chunks of
  `batch_size` rows -> fn's outputs (an array or a pytree of [batch_size, ...])
  for the N real rows, concatenated, as numpy.

  `split`: each chunk's leaves are put on this host's devices, split along
  their rows (`put_local_rows`) before fn sees them.
  """
  total = len(next(iter(arrays.values())))
  outputs = []
  for start in range(0, total, batch_size):
    rows = np.minimum(np.arange(start, start + batch_size), total - 1)
    chunk = {k: v[rows] for k, v in arrays.items()}
    if split:
      chunk = jax.tree.map(put_local_rows, chunk)
    out = distributed.to_host(fn(chunk, start))
    outputs.append(jax.tree.map(lambda x: np.asarray(x)[:total - start], out))
  return jax.tree.map(lambda *xs: np.concatenate(xs), *outputs)
