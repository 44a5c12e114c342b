"""Chunks of rows: sized to the devices, split over them, padding dropped."""
import jax
import numpy as np

from unclip_jax.pipeline import batching


def test_chunks_are_multiples_of_the_device_count():
  assert jax.local_device_count() == 8
  assert batching.chunk_size(1, max_batch=64) == 8
  assert batching.chunk_size(9, max_batch=64) == 16
  assert batching.chunk_size(100, max_batch=20) == 24  # max_batch rounded up


def test_rows_are_split_over_the_devices_and_padding_dropped():
  seen = []

  def fn(chunk, start):
    seen.append((start, chunk["x"].sharding.shard_shape(chunk["x"].shape)))
    return chunk["x"] * 2
  out = batching.map_rows(fn, {"x": np.arange(10.0)}, max_batch=8)
  np.testing.assert_array_equal(out, np.arange(10.0) * 2)
  assert seen == [(0, (1,)), (8, (1,))]  # 2 chunks of 8 rows, 1 row per device
