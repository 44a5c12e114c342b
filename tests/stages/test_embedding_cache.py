"""The embedding cache's columns read back as the CLIP wrote them, old or damaged caches
are rebuilt with their reason, and the train iterator over a cache (the prior's) is
sharded by process and resumes exactly, in a moved workdir too."""
import itertools
import json
import logging
import os
import shutil

import numpy as np
import pytest

from tests.data import interrupted_writer as writer
from tests.data.conftest import data_loader_iterator
from unclip_jax.data import pipeline
from unclip_jax.data.tokenizer import PAD_ID
from unclip_jax.stages import embedding_cache

FIELDS = ("image_embedding", "text_embedding", "text_encodings", "text_mask")


class _Captions(writer.TinyCaptionedImages):
  """Captions of different lengths (one empty, one past the context, non-ASCII)."""

  def __getitem__(self, index):
    caption = ["", "café ☕", "a much longer caption than the context"][index % 3]
    return {**super().__getitem__(index), "caption": caption + "!" * (index // 3)}

  def __repr__(self):
    return "_Captions(10)"


def _build(workdir, fingerprint="v1", source=None):
  return embedding_cache.build_or_load(str(workdir), "test", source or _Captions(),
                                       writer.FakeClip(fingerprint), batch_size=4)


def test_cache_reads_back_what_the_clip_computed(tmp_path):
  source, clip = _Captions(), writer.FakeClip("v1")
  cache = _build(tmp_path)
  records = [source[i] for i in range(len(source))]
  tokens = clip.tokenize([r["caption"] for r in records])
  text_embedding, encodings = clip.encode_text(tokens)
  images = np.stack([r["image"] for r in records]).astype(np.float32) / 127.5 - 1
  got = cache.read_batch(np.arange(len(source)))
  np.testing.assert_array_equal(got["tokens"], tokens)
  np.testing.assert_array_equal(got["text_mask"], tokens != PAD_ID)  # a prefix
  np.testing.assert_allclose(got["text_embedding"], text_embedding, rtol=1e-6)
  np.testing.assert_allclose(got["image_embedding"], clip.encode_image(images), rtol=1e-6)
  assert got["text_encodings"].dtype == np.float16
  np.testing.assert_array_equal(got["text_encodings"][got["text_mask"]],
                                encodings[tokens != PAD_ID].astype(np.float16))
  assert not got["text_encodings"][~got["text_mask"]].any()
  assert list(got["caption"]) == [r["caption"] for r in records]
  np.testing.assert_array_equal(got["label"], [r["label"] for r in records])
  # A batch in any order is the records one by one, stacked.
  order = [7, 0, 7, 3]
  batch = cache.select(FIELDS + ("caption",)).read_batch(order)
  for row, index in enumerate(order):
    for field, value in batch.items():
      np.testing.assert_array_equal(value[row], cache[index][field], err_msg=field)


@pytest.mark.parametrize("damage", ["old format", "short column", "missing column"])
def test_an_old_or_damaged_cache_is_rebuilt_saying_why(damage, tmp_path, caplog):
  _build(tmp_path)
  directory = embedding_cache.cache_dir(str(tmp_path), "test")
  column = os.path.join(directory, "text_encodings.bin")
  if damage == "old format":
    manifest = os.path.join(directory, embedding_cache.MANIFEST)
    with open(manifest) as f:
      text = f.read()
    with open(manifest, "w") as f:
      f.write(text.replace('"format": 2', '"format": 1'))
    reason = "the cache format changed: 1 -> 2"
  elif damage == "short column":
    with open(column, "r+b") as f:
      f.truncate(10)
    reason = "its column text_encodings.bin holds 10 bytes"
  else:
    os.remove(column)
    reason = "its column text_encodings.bin is missing"
  clip = writer.FakeClip("v1")
  with caplog.at_level(logging.INFO, logger="unclip_jax"):
    cache = embedding_cache.build_or_load(str(tmp_path), "test", _Captions(), clip,
                                          batch_size=4)
  assert clip.image_batches == 3 and reason in caplog.text
  assert len(cache.read_batch(range(10))["caption"]) == 10


def _iterator(cache, seed=0, process_index=0, process_count=1, batch_size=4):
  return pipeline.make_train_iterator(
      cache.select(FIELDS), global_batch_size=batch_size, seed=seed,
      process_index=process_index, process_count=process_count)


def _equal(batches_a, batches_b):
  assert len(batches_a) == len(batches_b)
  for a, b in zip(batches_a, batches_b):
    assert a.keys() == b.keys() == set(FIELDS)
    for field in FIELDS:
      np.testing.assert_array_equal(a[field], b[field], err_msg=field)


class _OneByOne:
  """The cache as a plain record source (no read_batch): the per-record path."""

  def __init__(self, cache):
    self._cache = cache

  def __len__(self):
    return len(self._cache)

  def __getitem__(self, index):
    return self._cache[index]


def test_whole_batch_reads_match_the_per_record_path(tmp_path):
  cache = _build(tmp_path)
  records = pipeline.make_train_iterator(
      _OneByOne(cache), global_batch_size=4, seed=3, process_index=0, process_count=1,
      preprocess=lambda r: {k: r[k] for k in FIELDS})
  _equal(list(itertools.islice(_iterator(cache, seed=3), 8)),
         list(itertools.islice(records, 8)))


def test_process_shards_are_disjoint_and_cover_the_cache(tmp_path):
  cache = _build(tmp_path)
  embeddings = [np.concatenate([b["image_embedding"] for b in itertools.islice(
      _iterator(cache, process_index=i, process_count=2, batch_size=2), 5)])
                for i in range(2)]  # one epoch of each 5-record shard
  rows = {tuple(row) for shard in embeddings for row in shard}
  every = {tuple(row) for row in cache.read_batch(range(10))["image_embedding"]}
  assert len(rows) == 10 and rows == every
  # Each shard is its own contiguous half of the records, reshuffled every epoch.
  np.testing.assert_array_equal(
      np.sort(embeddings[1], axis=0),
      np.sort(cache.read_batch(range(5, 10))["image_embedding"], axis=0))


def test_position_restores_through_orbax_in_a_moved_workdir(tmp_path):
  import orbax.checkpoint as ocp
  cache = _build(tmp_path / "run")
  iterator = _iterator(cache, seed=5)
  list(itertools.islice(iterator, 4))  # past the first epoch (2.5 batches)
  with ocp.CheckpointManager(tmp_path / "checkpoints") as manager:
    manager.save(4, args=ocp.args.Composite(data=pipeline.CheckpointSave(iterator)))
    manager.wait_until_finished()
  expected = list(itertools.islice(iterator, 3))
  shutil.move(str(tmp_path / "run"), str(tmp_path / "moved"))
  moved = embedding_cache.EmbeddingCache(
      embedding_cache.cache_dir(str(tmp_path / "moved"), "test"), "test")
  with ocp.CheckpointManager(tmp_path / "checkpoints") as manager:
    restored = manager.restore(4, args=ocp.args.Composite(
        data=pipeline.CheckpointRestore(_iterator(moved, seed=5))))["data"]
  _equal(list(itertools.islice(restored, 3)), expected)


def test_a_prior_checkpoint_from_before_the_columns_resumes(tmp_path):
  # The prior's iterator was a DataLoader over the whole cache, record by record.
  cache = _build(tmp_path)
  old = data_loader_iterator(cache, global_batch_size=4, seed=5,
                             preprocess=lambda r: {k: r[k] for k in FIELDS})
  new = _iterator(cache, seed=5)
  _equal(list(itertools.islice(old, 6)), list(itertools.islice(new, 6)))
  resumed = _iterator(cache, seed=5)
  resumed.set_state(json.loads(old.get_state()))
  _equal(list(itertools.islice(resumed, 3)), list(itertools.islice(old, 3)))


def test_a_state_restores_only_into_the_same_data(tmp_path):
  cache = _build(tmp_path)
  state = _iterator(cache, seed=5).get_state()
  with pytest.raises(ValueError, match="seed 5, here 6"):
    _iterator(cache, seed=6).set_state(state)
  with pytest.raises(ValueError, match="batch_size 4, here 2"):
    _iterator(cache, seed=5, batch_size=2).set_state(state)
  other = _build(tmp_path / "other", source=writer.TinyCaptionedImages())
  with pytest.raises(ValueError, match="source"):  # another split's cache, say
    _iterator(embedding_cache.EmbeddingCache(other.directory, "train"),
              seed=5).set_state(state)
