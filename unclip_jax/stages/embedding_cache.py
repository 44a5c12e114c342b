"""Frozen CLIP outputs for a whole split, computed once into a cache of columns.

The prior trains on CLIP embeddings, never on images: encoding every image and caption
at every step would cost more than the prior itself (MaxDiffusion caches latents and
text embeddings the same way). `workdir/cache/<split>/` holds

  <field>.bin     one column per field (data/columns.py): image_embedding,
                  text_embedding, tokens, integer labels; text_encodings (float16, only
                  each caption's real tokens) and caption (UTF-8) are ragged columns,
                  with <field>_end.bin
  manifest.json   what the cache was built from (CLIP fingerprint, source), its
                  record count, the columns' layout, and the mean / std of the image
                  embeddings

A cache is reused only when its manifest matches the CLIP checkpoint and the data it
would be built from; otherwise it is rebuilt, and the log says why. It is written into
`<split>.tmp/`, flushed to disk and renamed into place, so a killed build leaves no cache
that looks complete; the next run logs and removes what it left (`<split>.tmp/`, or
`<split>.old/` when killed during the swap) and builds again. `EmbeddingCache` reads it
memory-mapped: a batch is one gather per field (`read_batch`, which
`pipeline.make_train_iterator` uses), and its repr does not depend on the path, so the
data iterator's checkpointed position restores in another workdir too.
"""
import json
import logging
import os
import shutil
from typing import Any, Sequence

import jax
import numpy as np
from jax.experimental import multihost_utils

from unclip_jax.data import columns, pipeline
# The cache's fields: the generators' batch field names (text_mask derived on read).
from unclip_jax.generators.base import (IMAGE_EMBEDDING, TEXT_EMBEDDING,
                                        TEXT_ENCODINGS, TEXT_MASK, TOKENS)

log = logging.getLogger(__name__)

# Bump when the layout changes: old caches are then rebuilt. 2: columns, not records.
CACHE_FORMAT = 2
MANIFEST = "manifest.json"
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
  return columns.problem(directory, manifest["columns"])


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


def write_examples(writer: columns.ColumnWriter, *, image_embedding, text_embedding,
                   text_encodings, tokens, text_mask, captions: Sequence[str],
                   extra: dict | None = None) -> None:
  """Appends n examples ([n, ...] each) to the cache's columns. Only the real token
  encodings are kept (those of `text_mask` [n, L], a prefix): captions are usually
  far shorter than the context."""
  lengths = np.sum(np.asarray(text_mask, bool), axis=1)
  writer.append(IMAGE_EMBEDDING, np.asarray(image_embedding, np.float32))
  writer.append(TEXT_EMBEDDING, np.asarray(text_embedding, np.float32))
  writer.append(TOKENS, np.asarray(tokens, np.int32))
  writer.append_ragged(TEXT_ENCODINGS, [
      np.asarray(row[:length], np.float16) for row, length in zip(text_encodings, lengths)])
  writer.append_ragged(CAPTION, [np.frombuffer(str(caption).encode(), np.uint8)
                                 for caption in captions])
  for key, value in (extra or {}).items():
    writer.append(key, np.asarray(value))


def _build(directory: str, source, clip, identity: dict, batch_size: int) -> None:
  staging, previous = directory + STAGING_SUFFIX, directory + PREVIOUS_SUFFIX
  os.makedirs(staging)  # remove_killed_builds has cleared it

  def tokenize(record):
    return {**record, TOKENS: clip.tokenize([record[CAPTION]])[0]}

  writer = columns.ColumnWriter(staging)
  moments, count, max_tokens = _RunningMoments(), 0, 0
  for batch in pipeline.eval_batches(source, batch_size=batch_size, preprocess=tokenize):
    text_embedding, text_encodings = clip.encode_text(batch[TOKENS])
    image_embedding = clip.encode_image(batch[pipeline.IMAGE])
    text_embedding, text_encodings, image_embedding = jax.device_get(
        (text_embedding, text_encodings, image_embedding))
    valid = batch["mask"]
    moments.add(image_embedding[valid])
    masks = clip.text_mask(batch[TOKENS])[valid]
    max_tokens = max(max_tokens, int(np.max(np.sum(masks, 1))))
    write_examples(
        writer, image_embedding=image_embedding[valid],
        text_embedding=text_embedding[valid], text_encodings=text_encodings[valid],
        tokens=batch[TOKENS][valid], text_mask=masks, captions=batch[CAPTION][valid],
        extra={k: batch[k][valid] for k in _passthrough_fields(batch)})
    count += int(np.sum(valid))
  files = writer.close()
  mean, std = moments.result()
  manifest = {**identity, "num_records": count, "embed_dim": clip.embed_dim,
              "text_width": clip.text_width, "context_length": clip.context_length,
              "max_tokens": max_tokens,  # the longest caption, end token included
              "image_embedding_mean": mean, "image_embedding_std": std,
              "columns": writer.layout}
  with open(os.path.join(staging, MANIFEST), "w") as f:
    json.dump(manifest, f)
  for path in (*files, os.path.join(staging, MANIFEST), staging):
    _flush_to_disk(path)
  # Swap in the finished cache; a crash between the renames leaves no cache at all,
  # which the next run rebuilds.
  if os.path.exists(directory):
    os.rename(directory, previous)
  os.rename(staging, directory)
  _flush_to_disk(os.path.dirname(directory))
  shutil.rmtree(previous, ignore_errors=True)  # absent on a first build
  log.info("wrote %d records to %s", count, directory)


class EmbeddingCache:
  """A built cache, memory-mapped: `len`, `read_batch(indices)` (a host batch, one
  gather per field), and records one by one (`[i]`, `__getitems__`).

  Fields: image_embedding float32 [D], text_embedding float32 [D], text_encodings
  float16 [L, W] (zero past the caption), text_mask bool [L] (the caption's tokens,
  a prefix), tokens int32 [L], caption str, and the source's integer labels.
  """

  def __init__(self, directory: str, name: str, fields: Sequence[str] | None = None):
    self.directory = directory
    self.name = name
    self.manifest = _read_manifest(directory)
    if self.manifest is None:
      raise FileNotFoundError(f"no embedding cache in {directory}")
    layout = self.manifest["columns"]
    self._columns = columns.open_columns(directory, layout)
    stored = [k for k in layout if not k.endswith(columns.END)]
    every = stored + [TEXT_MASK] if TEXT_ENCODINGS in stored else stored
    self.fields = tuple(every if fields is None else fields)
    if unknown := set(self.fields) - set(every):
      raise KeyError(f"{self!r} has no fields {sorted(unknown)}; it has {every}")

  def select(self, fields: Sequence[str]) -> "EmbeddingCache":
    """This cache reading only `fields` (the same files, opened again: no data is read)."""
    return EmbeddingCache(self.directory, self.name, fields)

  def __len__(self) -> int:
    return self.manifest["num_records"]

  def _ragged(self, name: str):
    return self._columns[name], self._columns[name + columns.END]

  def read_batch(self, indices: Sequence[int]) -> dict[str, Any]:
    """Records `indices` as one batch: [b, ...] per field, captions object [b]."""
    indices = np.asarray(indices, np.int64)
    batch = {}
    if {TEXT_ENCODINGS, TEXT_MASK} & set(self.fields):
      context = self.manifest["columns"][TOKENS]["shape"][1]
      batch[TEXT_ENCODINGS], batch[TEXT_MASK] = columns.gather_padded(
          *self._ragged(TEXT_ENCODINGS), indices, context)
    if CAPTION in self.fields:
      batch[CAPTION] = columns.gather_strings(*self._ragged(CAPTION), indices)
    for field in self.fields:
      if field not in batch:
        batch[field] = np.asarray(self._columns[field][indices])
    return {field: batch[field] for field in self.fields}

  def __getitems__(self, indices: Sequence[int]) -> list[dict]:
    batch = self.read_batch(indices)
    return [{k: v[row] for k, v in batch.items()} for row in range(len(indices))]

  def __getitem__(self, index: int) -> dict:
    return self.__getitems__([index])[0]

  def arrays(self, indices: Sequence[int] | None = None,
             fields: Sequence[str] | None = None) -> dict[str, Any]:
    """Records `indices` (default: all) stacked into arrays, optionally only `fields`."""
    indices = np.arange(len(self)) if indices is None else list(indices)
    return (self if fields is None else self.select(fields)).read_batch(indices)

  @property
  def image_embedding_stats(self) -> tuple[np.ndarray, np.ndarray]:
    """Per-dimension (mean, std) of the image embeddings, float32 [embed_dim] each."""
    return (np.asarray(self.manifest["image_embedding_mean"], np.float32),
            np.asarray(self.manifest["image_embedding_std"], np.float32))

  def __reduce__(self):
    # Reopened where unpickled (grain's worker processes): a memmap would pickle
    # its whole file.
    return EmbeddingCache, (self.directory, self.name, self.fields)

  def __repr__(self) -> str:
    # The train iterator's state holds this string to name its data: no path, so a
    # moved workdir still resumes, and no fields, which do not move a position.
    return f"EmbeddingCache({self.name}, {len(self)} records)"
