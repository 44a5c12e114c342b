"""What the decoder's evaluation measures on its samples, and its samples grid.

- CLIP agreement (any data set): the frozen CLIP's embedding of each sample
  against the z_i it was conditioned on: `eval/clip_cos` (mean cosine) and
  `eval/clip_top1` (how often the sample's nearest z_i among the evaluated ones is
  its own). The `_truth` versions score the true images after the same resize,
  the ceiling a perfect decoder reaches at its resolution.
- Scene accuracies (`emoji_scenes`, whose records carry `emoji_index`,
  `color_index`, `position_index`): every (emoji, colour, position) of the data
  set, rendered exactly as the data renders it, is a template. Colour: the
  palette colour nearest to the sample's per-channel median pixel (the
  background covers 3/4 of the image). Position and identity: the position and
  the emoji of the template nearest to the sample (mean squared pixel distance)
  among every emoji at every position in the caption's colour, so an emoji drawn
  in the wrong place still counts for identity. `eval/scene_accuracy`: all three
  right.
"""
import os
import textwrap
from typing import Callable, Sequence

import numpy as np
from PIL import Image, ImageDraw

from unclip_jax.data import pipeline, scenes
from unclip_jax.data.images import make_grid, nearest_upscale
from unclip_jax.models.clip import l2_normalize_host

LABELS = ("emoji_index", "color_index", "position_index")
_PALETTE = np.asarray(list(scenes.COLORS.values()), np.float32)  # [colours, 3]


def clip_agreement(clip, images: np.ndarray, image_embedding: np.ndarray,
                   suffix: str = "") -> dict[str, float]:
  """`eval/clip_cos{suffix}`, `eval/clip_top1{suffix}` of uint8 images [N, S, S, 3]
  at the CLIP's resolution against the z_i [N, D] they should show."""
  encoded = clip.encode_image(np.asarray(images, np.float32) / 127.5 - 1.0)
  similarity = l2_normalize_host(encoded) @ l2_normalize_host(image_embedding).T
  return {
      f"eval/clip_cos{suffix}": float(np.mean(np.diag(similarity))),
      f"eval/clip_top1{suffix}": float(np.mean(
          similarity.argmax(axis=1) == np.arange(len(similarity)))),
  }


def nearest_color(images: np.ndarray) -> np.ndarray:
  """uint8 [N, H, W, 3] -> int [N]: the palette index nearest to each image's
  per-channel median pixel (the background's colour when it covers most of it)."""
  median = np.median(np.asarray(images, np.float32).reshape(len(images), -1, 3), 1)
  return np.argmin(((median[:, None] - _PALETTE[None]) ** 2).sum(-1), axis=1)


class SceneTemplates:
  """Every (emoji, colour, position) scene of a data set at the decoder's
  resolution: uint8 [emoji, colours, positions, R, R, 3]."""

  def __init__(self, templates: np.ndarray):
    self.templates = templates

  @classmethod
  def from_sources(cls, sources: Sequence, resize: Callable[[np.ndarray], np.ndarray],
                   chunk: int = 256) -> "SceneTemplates | None":
    """Templates from the records of `sources` (together they hold every
    combination: the splits of `emoji_scenes`), each image passed through
    `resize`; None when the records carry no scene labels (other data sets)."""
    if not sources or not all(k in sources[0][0] for k in LABELS):
      return None
    found = {}
    for source in sources:
      for start in range(0, len(source), chunk):
        for record in source.__getitems__(range(start, min(start + chunk,
                                                           len(source)))):
          key = tuple(int(record[k]) for k in LABELS)
          found[key] = resize(record[pipeline.IMAGE])
    shape = tuple(max(key[i] for key in found) + 1 for i in range(3))
    if len(found) != np.prod(shape):
      return None  # a subset of the combinations: nothing to compare against
    first = next(iter(found.values()))
    templates = np.zeros(shape + first.shape, np.uint8)
    for key, image in found.items():
      templates[key] = image
    return cls(templates)

  def accuracies(self, samples: np.ndarray, labels: dict[str, np.ndarray]
                 ) -> dict[str, float]:
    """Colour, position, identity and all-three accuracies of uint8 samples
    [N, R, R, 3] for captions with these `emoji_index`, `color_index`,
    `position_index` ([N] each)."""
    emoji, color, position = (np.asarray(labels[k]) for k in LABELS)
    samples = np.asarray(samples, np.float32)
    color_right = nearest_color(samples) == color
    nearest = []  # (emoji, position) of the nearest template in the caption's colour
    for n, sample in enumerate(samples):
      distance = ((self.templates[:, color[n]].astype(np.float32) - sample) ** 2
                  ).mean(axis=(2, 3, 4))  # [emoji, positions]
      nearest.append(np.unravel_index(np.argmin(distance), distance.shape))
    nearest = np.asarray(nearest).reshape(-1, 2)
    identity_right = nearest[:, 0] == emoji
    position_right = nearest[:, 1] == position
    return {
        "eval/color_accuracy": float(color_right.mean()),
        "eval/position_accuracy": float(position_right.mean()),
        "eval/identity_accuracy": float(identity_right.mean()),
        "eval/scene_accuracy": float((color_right & position_right
                                      & identity_right).mean()),
    }


_LABEL_WIDTH = 104  # pixels left of the tiles for the wrapped caption
_LINE_HEIGHT = 11


def write_sample_grid(path: str, samples: np.ndarray, truth: np.ndarray,
                      captions: Sequence[str]) -> str:
  """A PNG with a row per caption: its samples (uint8 [rows * k, R, R, 3], row-major),
  then the true image (uint8 [rows, R, R, 3]), the caption wrapped at the left.
  Small images are enlarged by pixel repetition to at least 64 px."""
  rows = len(truth)
  per_row = len(samples) // rows
  tiles = np.concatenate([samples.reshape((rows, per_row) + samples.shape[1:]),
                          truth[:, None]], axis=1)
  side = truth.shape[1]
  factor = max(1, -(-64 // side))
  tiles = nearest_upscale(tiles.reshape((-1,) + tiles.shape[2:]), factor)
  image = make_grid(tiles, rows=rows, cols=per_row + 1)
  canvas = Image.new("RGB", (image.shape[1] + _LABEL_WIDTH, image.shape[0]),
                     (255, 255, 255))
  canvas.paste(Image.fromarray(image), (_LABEL_WIDTH, 0))
  draw = ImageDraw.Draw(canvas)
  tile = side * factor
  max_lines = max(1, tile // _LINE_HEIGHT)
  for row, caption in enumerate(captions):
    lines = textwrap.wrap(str(caption), 17)[:max_lines]
    top = 2 + row * (tile + 2) + (tile - len(lines) * _LINE_HEIGHT) // 2
    for i, line in enumerate(lines):
      draw.text((2, top + i * _LINE_HEIGHT), line, fill=(0, 0, 0))
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = path + ".tmp"
  canvas.save(tmp, format="PNG")
  os.replace(tmp, path)
  return path
