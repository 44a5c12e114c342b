"""Image grids as PNG files: what generative stages write to workdir/samples/."""
import os
import textwrap

import numpy as np
from PIL import Image, ImageDraw

_PAD = 2  # pixels between tiles
_LABEL_WIDTH = 96  # pixels for per-row labels, left of the grid
_LABEL_CHARS = 15  # characters of PIL's default font per label line
_LINE_HEIGHT = 11


def to_uint8(images) -> np.ndarray:
  """float images in [-1, 1] [..., H, W, 3] -> uint8 in [0, 255], rounded."""
  images = np.asarray(images, np.float32)
  return np.clip(np.round((images + 1.0) * 127.5), 0, 255).astype(np.uint8)


def nearest_upscale(images: np.ndarray, factor: int) -> np.ndarray:
  """[N, h, w, C] -> [N, h * factor, w * factor, C] by pixel repetition, so a
  low-res image sits beside a high-res one at its true pixel size."""
  return np.repeat(np.repeat(np.asarray(images), factor, axis=1), factor, axis=2)


def make_grid(images: np.ndarray, rows: int, cols: int | None = None,
              labels: list[str] | None = None) -> np.ndarray:
  """uint8 [N, H, W, 3] -> one uint8 image of `rows` x `cols` tiles, row-major.

  Missing tiles (N < rows * cols) stay white. `labels` (one per row) are drawn
  left of their row, wrapped to as many lines as the row's height holds.
  """
  images = np.asarray(images)
  if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
    raise ValueError(f"expected uint8 [N, H, W, 3], got {images.dtype} "
                     f"{list(images.shape)}")
  count, height, width, _ = images.shape
  cols = cols or -(-count // rows)
  if count > rows * cols:
    raise ValueError(f"{count} images do not fit {rows} x {cols} tiles")
  if labels is not None and len(labels) != rows:
    raise ValueError(f"{len(labels)} labels for {rows} rows")
  left = _LABEL_WIDTH if labels else 0
  grid = np.full((rows * (height + _PAD) + _PAD,
                  left + cols * (width + _PAD) + _PAD, 3), 255, np.uint8)
  for index, image in enumerate(images):
    row, col = divmod(index, cols)
    top = _PAD + row * (height + _PAD)
    start = left + _PAD + col * (width + _PAD)
    grid[top:top + height, start:start + width] = image
  if not labels:
    return grid
  canvas = Image.fromarray(grid)
  draw = ImageDraw.Draw(canvas)
  max_lines = max(1, height // _LINE_HEIGHT)
  for row, label in enumerate(labels):
    lines = textwrap.wrap(str(label), _LABEL_CHARS)[:max_lines] or [""]
    top = _PAD + row * (height + _PAD) + (height - len(lines) * _LINE_HEIGHT) // 2
    for index, line in enumerate(lines):
      draw.text((2, top + index * _LINE_HEIGHT), line, fill=(0, 0, 0))
  return np.asarray(canvas)


def write_grid(path: str, images: np.ndarray, rows: int, cols: int | None = None,
               labels: list[str] | None = None) -> str:
  """Writes `make_grid(images, rows, cols, labels)` as a PNG at `path` (parent
  folders created; written to a temporary name first, so readers never see half
  a file). Returns `path`."""
  grid = make_grid(images, rows, cols, labels)
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = path + ".tmp"
  Image.fromarray(grid).save(tmp, format="PNG")
  os.replace(tmp, path)
  return path
