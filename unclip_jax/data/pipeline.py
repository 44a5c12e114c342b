"""The input pipeline the trainer uses: shuffled, sharded, checkpointable host batches.

Each process reads only its own shard of the records and yields HOST-LOCAL batches of
`global_batch_size // process_count` examples; `to_global` assembles them into one global
jax.Array per field. Batches are dicts:

  image   float32 [b, H, W, 3] in [-1, 1]
  caption object  [b] of str
  ...     every other numeric field of the record, stacked (ints as int32)

A train batch is read whole (`read_batch`): one gather per field from a source that
stores arrays (the embedding cache), else its records stacked. The train iterator is a
grain dataset iterator (`TrainIterator`): `get_state()` / `set_state()` give its
position as a dict, and orbax saves it beside the model with `CheckpointSave(iterator)`
under a grain `CheckpointHandler` (restore with `CheckpointRestore(iterator)`).
"""
from __future__ import annotations

import functools
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
    "make_train_iterator", "read_batch", "stack_records", "to_global",
    "to_model_inputs", "TrainIterator",
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


def read_batch(source, indices, preprocess: Preprocess | None = None) -> Record:
  """Records `indices` of `source` as one host batch.

  A source that stores whole arrays (`source.read_batch(indices)`: the embedding
  cache) gathers each field at once and delivers model inputs as they are; any other
  is read record by record, through `to_model_inputs(record, preprocess)`, stacked.
  """
  indices = [int(i) for i in indices]
  if hasattr(source, "read_batch"):
    if preprocess is not None:
      raise ValueError(f"{source!r} is read in whole batches: it takes no per-record "
                       "preprocess (select its fields instead)")
    return source.read_batch(indices)
  if hasattr(source, "__getitems__"):
    records = source.__getitems__(indices)
  else:
    records = [source[i] for i in indices]
  return stack_records([to_model_inputs(r, preprocess) for r in records])


# Host batches read ahead of the step, each by one thread: reading hides behind the
# step while a batch takes up to this many steps to read, in little memory.
READ_AHEAD = 4


def make_train_iterator(source, *, global_batch_size: int, seed: int,
                        preprocess: Preprocess | None = None,
                        process_index: int | None = None, process_count: int | None = None,
                        worker_count: int = 0) -> "TrainIterator":
  """An endless iterator of host-local batches (see the module docstring for the keys).

  Shuffles the whole source with `seed`, repeating it forever (epoch e shuffled with
  `seed + e`); this process reads the `process_index`-th of `process_count` disjoint,
  contiguous shards (default: this JAX process of all of them). Each batch is read
  whole by `read_batch`, up to READ_AHEAD of them ahead of the caller in threads, or in
  `worker_count` processes (these need absl flags parsed, as under `absl.app.run`).
  The batches depend only on the source, `seed`, the shard and the batch size;
  `get_state()` / `set_state()` save and restore the position (a JSON-able dict).
  """
  if process_index is None:
    process_index = jax.process_index()
  if process_count is None:
    process_count = jax.process_count()
  if global_batch_size % process_count:
    raise ValueError(f"global_batch_size {global_batch_size} does not divide by "
                     f"process_count {process_count}.")
  shard_size = len(source) // process_count  # the remainder is never read
  if shard_size == 0:
    raise ValueError(f"{source!r} has fewer records than the {process_count} processes")
  # The order grain's IndexSampler gives (what this pipeline used before it read whole
  # batches): record j of this shard's endless stream is index_shuffle(j) of epoch j // n.
  batches = (grain.MapDataset.range(shard_size * process_index,
                                    shard_size * (process_index + 1))
             .shuffle(seed=seed).repeat()
             .batch(global_batch_size // process_count, drop_remainder=True)
             .map(functools.partial(read_batch, source, preprocess=preprocess)))
  dataset = batches.to_iter_dataset(grain.ReadOptions(num_threads=READ_AHEAD,
                                                      prefetch_buffer_size=READ_AHEAD))
  if worker_count:
    dataset = dataset.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count))
  return TrainIterator(iter(dataset), {
      "source": repr(source), "num_records": len(source), "seed": seed,
      "shard": [process_index, process_count],
      "batch_size": global_batch_size // process_count, "worker_count": worker_count})


class TrainIterator(grain.DatasetIterator):
  """The train batches with a position that checkpoints (grain's CheckpointHandler
  saves `get_state()` as JSON): the data it indexes (`identity`: the source's repr,
  seed, shard, batch size) and where it is. `set_state` refuses another data's state,
  as grain's DataLoader did; a dataset iterator's own state is a bare index."""

  def __init__(self, batches: grain.DatasetIterator, identity: dict):
    super().__init__(batches)
    self.identity = identity

  def __next__(self) -> Record:
    return next(self._parent)

  def get_state(self) -> dict:
    return {**self.identity, "position": self._parent.get_state()}

  def set_state(self, state: dict) -> None:
    if "last_seen_indices" in state:
      state = from_data_loader_state(state, self.identity)
    differ = [k for k in self.identity if state.get(k) != self.identity[k]]
    if differ:
      raise ValueError(
          "the saved data iterator state is for other data (" + "; ".join(
              f"{k} {state.get(k)!r}, here {self.identity[k]!r}" for k in differ)
          + "); restore it into an iterator made with the same arguments")
    self._parent.set_state(state["position"])


def from_data_loader_state(state: dict, identity: dict) -> dict:
  """A state that grain's DataLoader saved (this pipeline until it read whole
  batches; same records, same order) as `TrainIterator` state for `identity`."""
  index, count = identity["shard"]
  sampler = grain.samplers.IndexSampler(
      num_records=identity["num_records"], shuffle=True, num_epochs=None,
      seed=identity["seed"], shard_options=grain.sharding.ShardOptions(
          shard_index=index, shard_count=count, drop_remainder=True))
  if (state["worker_count"], identity["worker_count"]) != (0, 0):
    raise ValueError("a data iterator state saved with worker processes by an older "
                     "version restores only into that version")
  for key, here in (("sampler", repr(sampler)), ("data_source", identity["source"])):
    if state[key] != here:
      raise ValueError(f"the saved data iterator state is for other data ({key} "
                       f"{state[key]!r}, here {here!r})")
  # The DataLoader's last index: the global position of this process's last record.
  records = (state["last_seen_indices"]["0"] + count - index) // count
  return {**identity, "position": {"next_index": records // identity["batch_size"]}}


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
    batch = read_batch(source, np.minimum(positions, num_records - 1), preprocess)
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
