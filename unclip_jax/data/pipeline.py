"""The input pipeline the trainer uses: shuffled, sharded, checkpointable host batches.

Each process reads only its own shard of the records and yields HOST-LOCAL batches of
`global_batch_size // process_count` examples; `to_global` assembles them into one global
jax.Array per field. Batches are dicts:

  image   float32 [b, H, W, 3] in [-1, 1]
  caption object  [b] of str
  ...     every other numeric field of the record, stacked (ints as int32)

The train iterator is a grain.DataLoaderIterator: `get_state()` / `set_state()` give its
position as bytes, and orbax saves it beside the model with `CheckpointSave(iterator)`
under a grain `CheckpointHandler` (restore with `CheckpointRestore(iterator)`).
"""
from __future__ import annotations

from typing import Callable, Iterator

import grain
import jax
import numpy as np

from unclip_jax.data.sources import (  # Re-exported: the pipeline's one entry point.
    CAPTION, IMAGE, decode_record, decode_text, get_data_source)

# Orbax integration shipped with grain 0.2.18 (present when orbax is installed).
CheckpointHandler = grain.checkpoint.CheckpointHandler
CheckpointSave = grain.checkpoint.CheckpointSave
CheckpointRestore = grain.checkpoint.CheckpointRestore

Record = dict
Preprocess = Callable[[Record], Record]

__all__ = [
    "CAPTION", "IMAGE", "CheckpointHandler", "CheckpointRestore", "CheckpointSave",
    "decode_record", "decode_text", "eval_batches", "get_data_source",
    "make_train_iterator", "stack_records", "to_global", "to_model_inputs",
]


def to_model_inputs(record: Record, preprocess: Preprocess | None = None) -> Record:
  """Applies `preprocess`, then scales a uint8 image (if any) to float32 in [-1, 1]."""
  if preprocess is not None:
    record = preprocess(dict(record))
  if IMAGE not in record:  # e.g. cached embeddings: nothing to scale
    return record
  image = np.asarray(record[IMAGE])
  if image.dtype == np.uint8:
    image = image.astype(np.float32) / 127.5 - 1.0
  return {**record, IMAGE: image.astype(np.float32)}


def stack_records(records) -> Record:
  """A list of records -> one batch: text as an object array, ints as int32."""

  def stack(*values):
    if isinstance(values[0], str):
      return np.array(values, dtype=object)
    batch = np.stack([np.asarray(v) for v in values])
    if batch.dtype == np.int64:  # jax runs in 32 bits unless told otherwise.
      return batch.astype(np.int32)
    return batch.astype(np.float32) if batch.dtype == np.float64 else batch

  return jax.tree.map(stack, *records)


class _ToModelInputs(grain.transforms.Map):

  def __init__(self, preprocess: Preprocess | None):
    self._preprocess = preprocess

  def map(self, element):
    return to_model_inputs(element, self._preprocess)


def make_train_iterator(source, *, global_batch_size: int, seed: int,
                        preprocess: Preprocess | None = None,
                        process_index: int | None = None, process_count: int | None = None,
                        worker_count: int = 0) -> grain.DataLoaderIterator:
  """An endless iterator of host-local batches (see the module docstring for the keys).

  Shuffles the whole source with `seed`, repeating it forever (each epoch reshuffled); this
  process reads the `process_index`-th of `process_count` disjoint shards (default: this
  JAX process of all of them). The batches depend only on the arguments, `worker_count`
  included (grain batches within each worker), and `get_state()` / `set_state()` save and
  restore the position; a state restores only into the same `worker_count`. Worker
  processes (worker_count > 0) need absl flags parsed, as under `absl.app.run`.
  """
  if process_index is None:
    process_index = jax.process_index()
  if process_count is None:
    process_count = jax.process_count()
  if global_batch_size % process_count:
    raise ValueError(f"global_batch_size {global_batch_size} does not divide by "
                     f"process_count {process_count}.")
  sampler = grain.samplers.IndexSampler(
      num_records=len(source),
      shard_options=grain.sharding.ShardOptions(
          shard_index=process_index, shard_count=process_count, drop_remainder=True),
      shuffle=True,
      num_epochs=None,
      seed=seed,
  )
  loader = grain.DataLoader(
      data_source=source,
      sampler=sampler,
      operations=[
          _ToModelInputs(preprocess),
          grain.transforms.Batch(global_batch_size // process_count, drop_remainder=True,
                                 batch_fn=stack_records),
      ],
      worker_count=worker_count,
  )
  return iter(loader)


def eval_batches(source, *, batch_size: int, preprocess: Preprocess | None = None,
                 limit: int | None = None, process_index: int = 0,
                 process_count: int = 1) -> Iterator[Record]:
  """Deterministic batches over the first `limit` records (None: all), in order.

  Every batch has `batch_size // process_count` rows so one compiled step serves them all:
  the last is padded by repeating the final record, and the extra key `mask` (bool [b]) is
  False on padding. Global batch k holds records [k * batch_size, (k + 1) * batch_size),
  split between processes in order; every process yields the same number of batches.
  """
  if batch_size % process_count:
    raise ValueError(f"batch_size {batch_size} does not divide by "
                     f"process_count {process_count}.")
  local_size = batch_size // process_count
  num_records = len(source) if limit is None else min(limit, len(source))
  for start in range(0, num_records, batch_size):
    first = start + process_index * local_size
    positions = np.arange(first, first + local_size)
    indices = np.minimum(positions, num_records - 1).tolist()
    if hasattr(source, "__getitems__"):
      records = source.__getitems__(indices)
    else:
      records = [source[i] for i in indices]
    batch = stack_records([to_model_inputs(r, preprocess) for r in records])
    batch["mask"] = positions < num_records
    yield batch


def to_global(local_batch: Record, sharding: jax.sharding.Sharding) -> Record:
  """Host-local numpy batch -> global jax.Arrays, batch dimension split by `sharding`.

  Every process passes its own rows; the global batch is their concatenation in process
  order. Text (object arrays) cannot live on devices and stays host-local numpy.
  """

  def put(value):
    value = np.asarray(value)
    if value.dtype == object:
      return value
    return jax.make_array_from_process_local_data(sharding, value)

  return {key: put(value) for key, value in local_batch.items()}
