"""Per-record preprocessing for datasets other than the bundled ones (any image size)."""
from __future__ import annotations

import functools

import numpy as np
from PIL import Image

from unclip_jax.data.sources import IMAGE


def _center_crop_and_resize(record: dict, *, resolution: int) -> dict:
  image = np.asarray(record[IMAGE])
  if image.ndim == 2:
    image = image[..., None]
  if image.shape[-1] == 1:  # Grayscale datasets still feed an RGB model.
    image = np.repeat(image, 3, axis=-1)
  image = image[..., :3]
  height, width = image.shape[:2]
  side = min(height, width)
  top, left = (height - side) // 2, (width - side) // 2
  square = Image.fromarray(np.ascontiguousarray(image[top:top + side, left:left + side]))
  # PIL widens the filter when shrinking, so this antialiases (unlike a strided gather).
  resized = square.resize((resolution, resolution), Image.Resampling.BICUBIC)
  return {**record, IMAGE: np.asarray(resized, np.uint8)}


def center_crop_and_resize(resolution: int):
  """A `preprocess` for the pipeline: the largest central square, resized to `resolution`,
  as uint8 RGB. Picklable, so it also works with grain worker processes."""
  return functools.partial(_center_crop_and_resize, resolution=resolution)
