"""Decoder training data: images and a frozen CLIP's cached z_i by the same index.

Images are read at the CLIP's resolution (what z_i was computed from) and resized
to the decoder's `data.resolution` by the loader (`resize_image`).
"""
from typing import Sequence

import numpy as np

from unclip_jax.data import pipeline
from unclip_jax.data.preprocess import center_crop_and_resize
from unclip_jax.stages import embedding_cache
from unclip_jax.stages.embedding_cache import IMAGE_EMBEDDING, TOKENS

IMAGE, CAPTION = pipeline.IMAGE, pipeline.CAPTION


class SquareImages:
  """A data source whose images are uint8 [side, side, 3]: the bundled data at
  the CLIP's resolution passes through; other data is centre-cropped and resized
  (what the embedding cache, which stacks images, needs)."""

  def __init__(self, source, side: int):
    self._source = source
    self._side = side
    self._resize = center_crop_and_resize(side)

  def __len__(self) -> int:
    return len(self._source)

  def _square(self, record: dict) -> dict:
    if np.shape(record[IMAGE]) == (self._side, self._side, 3):
      return record
    return self._resize(record)

  def __getitem__(self, index: int) -> dict:
    return self._square(self._source[index])

  def __getitems__(self, indices: Sequence[int]) -> list[dict]:
    return [self._square(r) for r in self._source.__getitems__(list(indices))]

  def __repr__(self) -> str:  # no address: grain and the cache compare it
    return f"SquareImages({self._source!r}, side={self._side})"


class PairedSource:
  """Record i of the image source with z_i and the caption tokens of record i of
  its embedding cache (built from that source, in order). Each read checks that
  the two captions agree, so a misaligned pair cannot train silently."""

  def __init__(self, images, cache: embedding_cache.EmbeddingCache):
    if len(images) != len(cache):
      raise ValueError(f"{images!r} has {len(images)} records but its embedding "
                       f"cache {cache!r} {len(cache)}; delete the cache to rebuild")
    self.images = images
    self.cache = cache

  def __len__(self) -> int:
    return len(self.images)

  @staticmethod
  def _pair(index: int, record: dict, cached: dict) -> dict:
    if cached[CAPTION] != record[CAPTION]:
      raise ValueError(f"record {index}: the cache holds {cached[CAPTION]!r}, the "
                       f"data {record[CAPTION]!r}; delete the cache to rebuild")
    return {**record, IMAGE_EMBEDDING: cached[IMAGE_EMBEDDING],
            TOKENS: cached[TOKENS]}

  def __getitem__(self, index: int) -> dict:
    return self._pair(index, self.images[index], self.cache[index])

  def __getitems__(self, indices: Sequence[int]) -> list[dict]:
    indices = list(indices)
    return [self._pair(i, r, c) for i, r, c in zip(
        indices, self.images.__getitems__(indices), self.cache.__getitems__(indices))]

  def __repr__(self) -> str:
    return f"PairedSource({self.images!r}, {self.cache!r})"
