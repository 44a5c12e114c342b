"""Running a compiled sampler over any number of rows: fixed-size chunks, padded
to a multiple of the local device count and split over this host's devices.

Every chunk has the same shape, so each sampler compiles once per request size
class, not once per request; the padding rows repeat the last real row and are
dropped from the outputs.
"""
from typing import Any, Callable

import jax
import numpy as np

from unclip_jax.stages import diffusion_common, frozen


def chunk_size(rows: int, max_batch: int) -> int:
  """Rows per compiled call: `rows` (at most `max_batch`) rounded up to a
  multiple of the device count."""
  devices = jax.local_device_count()
  rows = min(rows, max(max_batch, 1))
  return -(-rows // devices) * devices


def shard_rows(tree: Any) -> Any:
  """numpy leaves [B, ...] (B a multiple of the device count) -> arrays split
  over this host's devices along B (the mesh the frozen CLIP's params are on)."""
  return jax.tree.map(frozen.put_local_rows, tree)


def map_rows(fn: Callable[[Any, int], Any], arrays: dict[str, np.ndarray], *,
             max_batch: int) -> Any:
  """fn(sharded chunk, first row) over same-length numpy `arrays` -> fn's outputs
  (an array or a pytree of [chunk, ...]) for the real rows, as numpy."""
  rows = len(next(iter(arrays.values())))
  return diffusion_common.map_batches(
      lambda chunk, start: fn(shard_rows(chunk), start), arrays,
      chunk_size(rows, max_batch))
