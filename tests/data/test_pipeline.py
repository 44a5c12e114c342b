"""The train iterator: deterministic, sharded by process, resumable (from the states of
the DataLoader it replaced too); eval batches; to_global."""
import itertools
import json

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from unclip_jax.data import pipeline

from tests.data.conftest import data_loader_iterator, tiny_data_config


def _take(iterator, count):
  return list(itertools.islice(iterator, count))


def _same(batches_a, batches_b):
  return all((a["image"] == b["image"]).all() and list(a["caption"]) == list(b["caption"])
             for a, b in zip(batches_a, batches_b, strict=True))


def _triples(batches):
  return [tuple(t) for b in batches
          for t in zip(b["emoji_index"], b["color_index"], b["position_index"])]


def test_source_records_are_standardised(tiny_train_source):
  record = tiny_train_source[0]
  assert isinstance(record["caption"], str) and isinstance(record["emoji_name"], str)
  assert record["caption"].startswith(record["emoji_name"] + " on a ")
  assert record["image"].dtype == np.uint8


def test_second_get_data_source_just_opens(tiny_data_dir, monkeypatch):
  import tensorflow_datasets as tfds
  monkeypatch.setattr(tfds.core.DatasetBuilder, "download_and_prepare",
                      lambda *a, **k: pytest.fail("rebuilt a prepared dataset"))
  source = pipeline.get_data_source(tiny_data_config(tiny_data_dir), "test")
  assert len(source) == 88


def test_batches_have_the_documented_keys_dtypes_and_shapes(tiny_train_source):
  batch = next(pipeline.make_train_iterator(
      tiny_train_source, global_batch_size=8, seed=0, process_index=0, process_count=1))
  assert batch["image"].shape == (8, 16, 16, 3) and batch["image"].dtype == np.float32
  assert -1.0 <= batch["image"].min() and batch["image"].max() <= 1.0
  assert batch["caption"].shape == (8,) and batch["caption"].dtype == object
  assert all(isinstance(c, str) for c in batch["caption"])
  assert batch["emoji_index"].dtype == np.int32


def test_train_iterator_is_deterministic_for_a_seed(tiny_train_source):
  make = lambda seed: pipeline.make_train_iterator(
      tiny_train_source, global_batch_size=8, seed=seed, process_index=0, process_count=1)
  assert _same(_take(make(0), 3), _take(make(0), 3))
  assert not _same(_take(make(0), 3), _take(make(1), 3))


def test_process_shards_are_disjoint_and_cover_the_data(tiny_train_source):
  shards = [
      _take(pipeline.make_train_iterator(tiny_train_source, global_batch_size=8, seed=0,
                                         process_index=index, process_count=2), 44)
      for index in range(2)]  # 44 batches of 4 = one epoch of each 176-record shard.
  assert all(b["image"].shape[0] == 4 for shard in shards for b in shard)
  first, second = (_triples(shard) for shard in shards)
  assert len(set(first)) == len(first) == 176 and len(set(second)) == 176
  assert set(first).isdisjoint(second)
  assert len(set(first) | set(second)) == len(tiny_train_source)


def test_global_batch_must_divide_by_process_count(tiny_train_source):
  with pytest.raises(ValueError, match="does not divide"):
    pipeline.make_train_iterator(tiny_train_source, global_batch_size=9, seed=0,
                                 process_index=0, process_count=2)


def test_restored_state_continues_with_identical_batches(tiny_data_dir):
  config = tiny_data_config(tiny_data_dir)
  make = lambda: pipeline.make_train_iterator(
      pipeline.get_data_source(config, "train"), global_batch_size=8, seed=5,
      process_index=0, process_count=1)
  iterator = make()
  _take(iterator, 50)  # Past the first epoch (44 batches), into the reshuffled second.
  state = iterator.get_state()
  expected = _take(iterator, 3)
  resumed = make()  # A fresh source object too: as after a restart.
  resumed.set_state(state)
  assert _same(_take(resumed, 3), expected)


def test_iterator_round_trips_through_orbax(tiny_train_source, tmp_path):
  import orbax.checkpoint as ocp
  make = lambda: pipeline.make_train_iterator(
      tiny_train_source, global_batch_size=8, seed=2, process_index=0, process_count=1)
  iterator = make()
  _take(iterator, 7)
  with ocp.CheckpointManager(tmp_path) as manager:
    manager.save(7, args=ocp.args.Composite(data=pipeline.CheckpointSave(iterator)))
    manager.wait_until_finished()
  expected = _take(iterator, 2)
  with ocp.CheckpointManager(tmp_path) as manager:
    restored = manager.restore(
        7, args=ocp.args.Composite(data=pipeline.CheckpointRestore(make())))["data"]
  assert _same(_take(restored, 2), expected)


def test_eval_batches_are_deterministic_padded_and_masked(tiny_train_source):
  make = lambda: list(pipeline.eval_batches(tiny_train_source, batch_size=16, limit=40))
  batches = make()
  assert [b["image"].shape[0] for b in batches] == [16, 16, 16]
  assert [int(b["mask"].sum()) for b in batches] == [16, 16, 8]
  assert _same(batches, make())
  in_order = [tiny_train_source[i]["caption"] for i in range(40)]
  assert [c for b in batches for c, m in zip(b["caption"], b["mask"]) if m] == in_order
  halves = [list(pipeline.eval_batches(tiny_train_source, batch_size=16, limit=40,
                                       process_index=i, process_count=2)) for i in range(2)]
  for whole, first, second in zip(batches, *halves, strict=True):
    assert list(whole["caption"]) == list(first["caption"]) + list(second["caption"])


def test_to_global_shards_the_batch_over_devices(tiny_train_source):
  batch = next(pipeline.make_train_iterator(
      tiny_train_source, global_batch_size=8, seed=0, process_index=0, process_count=1))
  mesh = jax.make_mesh((jax.device_count(),), ("data",))
  global_batch = pipeline.to_global(batch, NamedSharding(mesh, PartitionSpec("data")))
  assert isinstance(global_batch["image"], jax.Array)
  assert len(global_batch["image"].sharding.device_set) == jax.device_count()
  np.testing.assert_array_equal(np.asarray(global_batch["image"]), batch["image"])
  assert global_batch["caption"] is batch["caption"]  # Text stays on the host.


@pytest.mark.parametrize("process_index,process_count", [(0, 1), (1, 2)])
def test_same_batches_as_the_data_loader_and_its_states_resume(
    tiny_train_source, process_index, process_count):
  # Checkpoints saved before batches were read whole resume where they stopped, with
  # the batches they would have had.
  args = dict(global_batch_size=8, seed=4, process_index=process_index,
              process_count=process_count)
  old = data_loader_iterator(tiny_train_source, **args)
  new = pipeline.make_train_iterator(tiny_train_source, **args)
  assert _same(_take(old, 50), _take(new, 50))  # into the reshuffled second epoch
  resumed = pipeline.make_train_iterator(tiny_train_source, **args)
  resumed.set_state(json.loads(old.get_state()))  # as orbax's grain handler reads it
  assert _same(_take(resumed, 3), _take(old, 3))
  other_seed = pipeline.make_train_iterator(tiny_train_source, **{**args, "seed": 5})
  with pytest.raises(ValueError, match="other data"):
    other_seed.set_state(json.loads(old.get_state()))
