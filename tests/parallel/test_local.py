"""This host's devices: rows put on them, chunks sized to them, split over them,
padding dropped."""
import jax
import numpy as np

from unclip_jax.parallel import local


def test_chunks_are_multiples_of_the_device_count():
  assert jax.local_device_count() == 8
  assert local.chunk_size(1, max_batch=64) == 8
  assert local.chunk_size(9, max_batch=64) == 16
  assert local.chunk_size(100, max_batch=20) == 24  # max_batch rounded up


def test_rows_are_split_over_the_devices_and_padding_dropped():
  seen = []

  def fn(chunk, start):
    seen.append((start, chunk["x"].sharding.shard_shape(chunk["x"].shape)))
    return chunk["x"] * 2
  out = local.map_batches(fn, {"x": np.arange(10.0)}, local.chunk_size(10, 8),
                          split=True)
  np.testing.assert_array_equal(out, np.arange(10.0) * 2)
  assert seen == [(0, (1,)), (8, (1,))]  # 2 chunks of 8 rows, 1 row per device


def test_unsplit_batches_stay_numpy_shaped():
  out = local.map_batches(lambda chunk, start: chunk["x"] + start,
                          {"x": np.zeros(5)}, 2)
  np.testing.assert_array_equal(out, [0, 0, 2, 2, 4])


def test_put_local_rows_splits_rows_or_replicates_when_they_do_not_divide():
  split = local.put_local_rows(np.arange(16.0).reshape(8, 2))
  assert split.sharding.shard_shape(split.shape) == (1, 2)
  assert split.sharding.mesh.axis_names == (local.LOCAL_AXIS,)
  odd = local.put_local_rows(np.arange(3))
  assert odd.sharding.is_fully_replicated
  assert set(odd.sharding.device_set) == set(jax.local_devices())
  np.testing.assert_array_equal(odd, np.arange(3))
