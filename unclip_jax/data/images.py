"""Image helpers, all in one place: float <-> uint8, resizing, user images made
square RGB (a path, a PIL image or an array), and PNG grids (what generative
stages write to workdir/samples/ and the sample CLI writes)."""
import os
import textwrap
from typing import Any, Sequence

import numpy as np
from PIL import Image, ImageDraw, UnidentifiedImageError

from unclip_jax.data.preprocess import center_crop_and_resize
from unclip_jax.data.sources import IMAGE
from unclip_jax.errors import UserError

_PAD = 2  # pixels between tiles
_LABEL_WIDTH = 96  # pixels for per-row labels, left of the grid
_LABEL_CHARS = 15  # characters of PIL's default font per label line
_LINE_HEIGHT = 11


def to_uint8(images) -> np.ndarray:
  """float images in [-1, 1] [..., H, W, 3] -> uint8 in [0, 255], rounded."""
  images = np.asarray(images, np.float32)
  return np.clip(np.round((images + 1.0) * 127.5), 0, 255).astype(np.uint8)


def resize_image(image: np.ndarray, side: int) -> np.ndarray:
  """uint8 [S, S, 3] -> uint8 [side, side, 3]: area-averaged when shrinking (a
  2x shrink is the mean of each 2x2 block), bicubic when enlarging."""
  image = np.asarray(image)
  if image.shape[0] == side and image.shape[1] == side:
    return image
  method = (Image.Resampling.BOX if image.shape[0] >= side
            else Image.Resampling.BICUBIC)
  return np.asarray(Image.fromarray(image).resize((side, side), method), np.uint8)


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


# Images given to the pipeline and the CLI.

MIN_IMAGE_SIDE = 8  # smaller is an icon or a placeholder, not a picture to vary
_READ_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)
_HOW = "pass a PNG or JPEG file, a PIL image or a uint8 array [H, W, 3]"


def _open(path: str) -> Image.Image:
  if not os.path.exists(path):
    raise UserError(f"no image at {path}; check the path")
  if os.path.isdir(path):
    raise UserError(f"{path} is a folder, not an image; {_HOW}")
  try:
    image = Image.open(path)
    image.load()
  except _READ_ERRORS as e:
    reason = ("not a format PIL reads" if isinstance(e, UnidentifiedImageError)
              else " ".join(str(e).split()) or type(e).__name__)
    raise UserError(f"cannot read {path} as an image ({reason}); {_HOW}") from None
  return image


def _high_bit_depth_to_uint8(values: np.ndarray, what: str) -> np.ndarray:
  """16-bit values (stored in uint16 or int32) -> uint8, 65535 -> 255."""
  if values.min() < 0 or values.max() > 65535:
    raise UserError(f"{what} holds values outside 0..65535; save it as an "
                    "8-bit image")
  return np.round(values.astype(np.float64) / 257.0).astype(np.uint8)


def _pil_to_array(image: Image.Image, name: str) -> np.ndarray:
  """Any PIL mode -> uint8 [H, W, 3]: transparency composited on white,
  16-bit greyscale scaled to 8 bits, CMYK, palette, 1-bit and the rest
  converted by PIL. `name` says which image in errors."""
  if image.mode.startswith("I"):  # I;16 (16-bit PNG), I (32-bit integer)
    grey = _high_bit_depth_to_uint8(np.asarray(image),
                                    f"{name} (mode {image.mode})")
    return np.repeat(grey[..., None], 3, axis=-1)
  if image.mode == "F":
    raise UserError(f"{name} is floating-point (mode F), which has no fixed "
                    "range; save it as an 8-bit image")
  if image.mode in ("RGBA", "LA", "PA", "La", "RGBa") or (
      image.mode == "P" and "transparency" in image.info):
    background = Image.new("RGBA", image.size, (255, 255, 255, 255))
    image = Image.alpha_composite(background, image.convert("RGBA"))
  return np.asarray(image.convert("RGB"))


def _to_array(image: Any) -> np.ndarray:
  """A path, PIL image or array -> uint8 [H, W, 3] or [H, W, 4] (RGBA)."""
  name = "an image"
  if isinstance(image, (str, os.PathLike)):
    name = os.fspath(image)
    image = _open(name)
  if isinstance(image, Image.Image):
    image = _pil_to_array(image, name)
  if not isinstance(image, np.ndarray):
    raise UserError(f"got {type(image).__name__}, not an image; {_HOW}")
  if image.ndim == 2 or (image.ndim == 3 and image.shape[-1] == 1):
    image = np.repeat(image.reshape(image.shape[:2] + (1,)), 3, axis=-1)
  if image.ndim != 3 or image.shape[-1] not in (3, 4):
    raise UserError(f"images must be [H, W, 3] (RGB) or [H, W, 4] (RGBA); got "
                    f"shape {list(image.shape)}")
  if image.dtype == np.uint16:
    image = _high_bit_depth_to_uint8(image, f"{name} (uint16)")
  elif image.dtype == np.bool_:
    image = image.astype(np.uint8) * 255
  elif image.dtype != np.uint8:
    raise UserError(f"images must be uint8 (0..255); got {image.dtype}: for "
                    "floats in [0, 1] pass np.uint8(np.round(np.clip(image, 0, "
                    "1) * 255))")
  if min(image.shape[:2]) < MIN_IMAGE_SIDE:
    raise UserError(f"{name} is {image.shape[1]}x{image.shape[0]} px, too small "
                    f"to show anything; pass one at least {MIN_IMAGE_SIDE} px "
                    "on each side")
  return image


def square_image(image: Any) -> np.ndarray:
  """One image -> uint8 [S, S, 3]: RGBA composited on white, the central square
  of a non-square image."""
  image = _to_array(image)
  if image.shape[-1] == 4:
    return square_image(Image.fromarray(image, "RGBA"))
  height, width = image.shape[:2]
  if height == width:
    return image
  return center_crop_and_resize(min(height, width))({IMAGE: image})[IMAGE]


def as_image_list(images: Any) -> list[Any]:
  """One image or several (a list, or a uint8 [N, H, W, C] array) -> a list."""
  if isinstance(images, np.ndarray) and images.ndim == 4:
    return list(images)
  if isinstance(images, Sequence) and not isinstance(images, str):
    if not images:
      raise UserError("no images given")
    return list(images)
  return [images]


def at_resolution(images: list[np.ndarray], side: int) -> np.ndarray:
  """Square uint8 images -> float32 [N, side, side, 3] in [-1, 1]."""
  return np.stack([resize_image(image, side) for image in images]
                  ).astype(np.float32) / 127.5 - 1.0
