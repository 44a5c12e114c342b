"""Frozen CLIP outputs for a whole split, computed once into an array_record cache.

The prior trains on CLIP embeddings, never on images: encoding every image and caption
at every step would cost more than the prior itself (MaxDiffusion caches latents and
text embeddings the same way). `workdir/cache/<split>/` holds

  records.array_record  one msgpack record per example (fields below)
  manifest.json         what the cache was built from (CLIP fingerprint, source), its
                        record count, and the mean / std of the image embeddings

A cache is reused only when its manifest matches the CLIP checkpoint and the data it
would be built from; otherwise it is rebuilt, and the log says why. It is written into
`<split>.tmp/`, flushed to disk and renamed into place, so a killed build leaves no cache
that looks complete; the next run logs and removes what it left (`<split>.tmp/`, or
`<split>.old/` when killed during the swap) and builds again. `EmbeddingCache` reads it
as a random-access source for grain
(`pipeline.make_train_iterator`), with a repr that does not depend on the path, so the
data iterator's position restores from checkpoints.
"""
import json
import logging
import os
import shutil
from typing import Any, Sequence

import jax
import numpy as np
from array_record.python.array_record_data_source import ArrayRecordDataSource
from array_record.python.array_record_module import ArrayRecordWriter
from flax import serialization
from jax.experimental import multihost_utils

from unclip_jax.data import pipeline
from unclip_jax.data.tokenizer import PAD_ID
# Record fields: the generators' batch field names (text_mask derived on read).
from unclip_jax.generators.base import (IMAGE_EMBEDDING, TEXT_EMBEDDING,
                                        TEXT_ENCODINGS, TEXT_MASK, TOKENS)

log = logging.getLogger(__name__)

# Bump when the record layout changes: old caches are then rebuilt.
CACHE_FORMAT = 1
MANIFEST = "manifest.json"
RECORDS = "records.array_record"
# Beside `cache/<split>`: the cache being built, and the one it replaces during the swap.
STAGING_SUFFIX, PREVIOUS_SUFFIX = ".tmp", ".old"

CAPTION = pipeline.CAPTION


def cache_dir(workdir: str, split: str) -> str:
  return os.path.join(workdir, "cache", split)


def _read_manifest(directory: str) -> dict | None:
  path = os.path.join(directory, MANIFEST)
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def stale_reason(directory: str, identity: dict) -> str | None:
  """Why the cache in `directory` cannot be used for `identity` (None: it can)."""
  try:
    manifest = _read_manifest(directory)
  except ValueError:  # Not JSON: damaged outside our writes, which rename it in whole.
    return "its manifest is unreadable"
  if manifest is None:
    return "there is none yet"
  for key, what in (("format", "the cache format"), ("clip", "the CLIP checkpoint"),
                    ("source", "the data")):
    if manifest.get(key) != identity[key]:
      return f"{what} changed: {manifest.get(key)} -> {identity[key]}"
  if not os.path.exists(os.path.join(directory, RECORDS)):
    return "its records file is missing"
  return None


def build_or_load(workdir: str, split: str, source, clip, *,
                  batch_size: int = 256) -> "EmbeddingCache":
  """The cache of `clip`'s outputs for every record of `source` (one split).

  Reuses `workdir/cache/<split>` when it was built from this CLIP checkpoint
  (`clip.fingerprint`) and this source; otherwise (re)builds it on process 0 while
  the other processes wait (the workdir is shared between hosts).
  """
  directory = cache_dir(workdir, split)
  identity = {"format": CACHE_FORMAT, "clip": clip.fingerprint, "source": repr(source)}
  if jax.process_index() == 0:
    remove_killed_builds(directory)
  reason = stale_reason(directory, identity)
  if reason is not None and jax.process_index() == 0:
    log.info("computing the %s embedding cache in %s (%s)", split, directory, reason)
    _build(directory, source, clip, identity, batch_size)
  elif reason is None:
    log.info("reusing the %s embedding cache in %s", split, directory)
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(f"embedding cache {split}")
  return EmbeddingCache(directory, name=split)


def remove_killed_builds(directory: str) -> list[str]:
  """Deletes the folders a killed build of the cache in `directory` left; returns them.

  Only process 0 builds, so on process 0 nothing else can be writing them.
  """
  leftovers = [path for path in (directory + STAGING_SUFFIX, directory + PREVIOUS_SUFFIX)
               if os.path.exists(path)]
  if leftovers:
    log.warning("removing %s, left by an embedding cache build that was killed",
                " and ".join(leftovers))
  for leftover in leftovers:
    shutil.rmtree(leftover)
  return leftovers


def _flush_to_disk(path: str) -> None:
  """fsync a file or folder: a rename must not reach the disk before what it names."""
  descriptor = os.open(path, os.O_RDONLY)
  try:
    os.fsync(descriptor)
  finally:
    os.close(descriptor)


def _passthrough_fields(batch: dict) -> list[str]:
  """Integer labels worth keeping (emoji / colour / position indices and the like)."""
  return [k for k, v in batch.items()
          if k not in (pipeline.IMAGE, TOKENS, "mask") and isinstance(v, np.ndarray)
          and v.ndim == 1 and np.issubdtype(v.dtype, np.integer)]


class _RunningMoments:
  """Per-dimension mean and standard deviation, accumulated in float64."""

  def __init__(self):
    self.count, self.total, self.total_squares = 0, 0.0, 0.0

  def add(self, rows: np.ndarray):
    rows = rows.astype(np.float64)
    self.count += len(rows)
    self.total = self.total + rows.sum(axis=0)
    self.total_squares = self.total_squares + np.square(rows).sum(axis=0)

  def result(self) -> tuple[list[float], list[float]]:
    mean = self.total / self.count
    variance = np.maximum(self.total_squares / self.count - np.square(mean), 0.0)
    return mean.tolist(), np.sqrt(variance).tolist()


def _build(directory: str, source, clip, identity: dict, batch_size: int) -> None:
  staging, previous = directory + STAGING_SUFFIX, directory + PREVIOUS_SUFFIX
  os.makedirs(staging)  # remove_killed_builds has cleared it

  def tokenize(record):
    return {**record, TOKENS: clip.tokenize([record[CAPTION]])[0]}

  writer = ArrayRecordWriter(os.path.join(staging, RECORDS), "group_size:1")
  moments, count, max_tokens = _RunningMoments(), 0, 0
  for batch in pipeline.eval_batches(source, batch_size=batch_size, preprocess=tokenize):
    text_embedding, text_encodings = clip.encode_text(batch[TOKENS])
    image_embedding = clip.encode_image(batch[pipeline.IMAGE])
    text_embedding, text_encodings, image_embedding = jax.device_get(
        (text_embedding, text_encodings, image_embedding))
    valid = batch["mask"]
    moments.add(image_embedding[valid])
    masks = clip.text_mask(batch[TOKENS])
    max_tokens = max(max_tokens, int(np.max(np.sum(masks[valid], 1))))
    extra = _passthrough_fields(batch)
    for row in np.flatnonzero(valid):
      writer.write(encode_record(
          image_embedding=image_embedding[row], text_embedding=text_embedding[row],
          text_encodings=text_encodings[row], tokens=batch[TOKENS][row],
          text_mask=masks[row], caption=str(batch[CAPTION][row]),
          extra={k: batch[k][row] for k in extra}))
      count += 1
  writer.close()
  mean, std = moments.result()
  manifest = {**identity, "num_records": count, "embed_dim": clip.embed_dim,
              "text_width": clip.text_width, "context_length": clip.context_length,
              "max_tokens": max_tokens,  # the longest caption, end token included
              "image_embedding_mean": mean, "image_embedding_std": std}
  with open(os.path.join(staging, MANIFEST), "w") as f:
    json.dump(manifest, f)
  for path in (os.path.join(staging, RECORDS), os.path.join(staging, MANIFEST), staging):
    _flush_to_disk(path)
  # Swap in the finished cache; a crash between the renames leaves no cache at all,
  # which the next run rebuilds.
  if os.path.exists(directory):
    os.rename(directory, previous)
  os.rename(staging, directory)
  _flush_to_disk(os.path.dirname(directory))
  shutil.rmtree(previous, ignore_errors=True)  # absent on a first build
  log.info("wrote %d records to %s", count, directory)


def encode_record(*, image_embedding, text_embedding, text_encodings, tokens,
                  caption: str, extra: dict | None = None,
                  text_mask=None) -> bytes:
  """One example -> msgpack bytes. Only the real token encodings are kept (those
  of `text_mask` [L], the CLIP's; default: the non-pad tokens of ours): captions
  are usually far shorter than the context."""
  tokens = np.asarray(tokens, np.int32)
  length = int(np.sum(tokens != PAD_ID if text_mask is None else text_mask))
  record = {IMAGE_EMBEDDING: np.asarray(image_embedding, np.float32),
            TEXT_EMBEDDING: np.asarray(text_embedding, np.float32),
            TEXT_ENCODINGS: np.asarray(text_encodings[:length], np.float16),
            TOKENS: tokens, CAPTION: caption}
  for key, value in (extra or {}).items():
    record[key] = np.asarray(value)
  return serialization.msgpack_serialize(record)


def decode_record(data: bytes) -> dict:
  """msgpack bytes -> the record, token encodings zero-padded to the context; the
  text mask marks the kept ones (the real tokens, a prefix)."""
  record = serialization.msgpack_restore(data)
  tokens = record[TOKENS]
  kept = record[TEXT_ENCODINGS]
  encodings = np.zeros((len(tokens), kept.shape[-1]), np.float16)
  encodings[:len(kept)] = kept
  record[TEXT_ENCODINGS] = encodings
  record[TEXT_MASK] = np.arange(len(tokens)) < len(kept)
  return record


class EmbeddingCache:
  """A built cache as a random-access source: `len`, `[i]`, `__getitems__`."""

  def __init__(self, directory: str, name: str):
    self.directory = directory
    self.name = name
    self.manifest = _read_manifest(directory)
    if self.manifest is None:
      raise FileNotFoundError(f"no embedding cache in {directory}")
    self._records = ArrayRecordDataSource(os.path.join(directory, RECORDS))
    if len(self._records) != self.manifest["num_records"]:
      raise ValueError(f"{directory} holds {len(self._records)} records, its "
                       f"manifest {self.manifest['num_records']}; delete it to rebuild")

  def __len__(self) -> int:
    return len(self._records)

  def __getitem__(self, index: int) -> dict:
    return decode_record(self._records[index])

  def __getitems__(self, indices: Sequence[int]) -> list[dict]:
    return [decode_record(r) for r in self._records.__getitems__(list(indices))]

  def arrays(self, indices: Sequence[int] | None = None,
             fields: Sequence[str] | None = None) -> dict[str, Any]:
    """Records `indices` (default: all) stacked into arrays, optionally only `fields`."""
    indices = range(len(self)) if indices is None else indices
    records = self.__getitems__(list(indices))
    if fields is not None:
      records = [{k: r[k] for k in fields} for r in records]
    return pipeline.stack_records(records)

  @property
  def image_embedding_stats(self) -> tuple[np.ndarray, np.ndarray]:
    """Per-dimension (mean, std) of the image embeddings, float32 [embed_dim] each."""
    return (np.asarray(self.manifest["image_embedding_mean"], np.float32),
            np.asarray(self.manifest["image_embedding_std"], np.float32))

  def __repr__(self) -> str:
    # grain compares this string when it restores an iterator: no path, no address.
    return f"EmbeddingCache({self.name}, {len(self)} records)"
