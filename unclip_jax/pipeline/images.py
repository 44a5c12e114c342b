"""Images given to the pipeline (a path, a PIL image or an array), made square
RGB uint8 at a stage's resolution."""
import os
from typing import Any, Sequence

import numpy as np
from PIL import Image

from unclip_jax.data.preprocess import center_crop_and_resize
from unclip_jax.data.sources import IMAGE
from unclip_jax.errors import UserError
from unclip_jax.stages.decoder import resize_image


def _to_array(image: Any) -> np.ndarray:
  if isinstance(image, (str, os.PathLike)):
    if not os.path.exists(image):
      raise UserError(f"no image at {image}")
    try:
      image = Image.open(image)
      image.load()
    except OSError as e:
      raise UserError(f"cannot read {image.filename} as an image: {e}") from None
  if isinstance(image, Image.Image):
    if image.mode in ("RGBA", "LA", "P"):  # transparent pixels onto white
      background = Image.new("RGBA", image.size, (255, 255, 255, 255))
      image = Image.alpha_composite(background, image.convert("RGBA"))
    image = np.asarray(image.convert("RGB"))
  image = np.asarray(image)
  if image.dtype != np.uint8:
    raise UserError(f"images must be uint8 RGB arrays [H, W, 3] (or paths, PIL "
                    f"images); got {image.dtype}")
  if image.ndim == 2:
    image = np.repeat(image[..., None], 3, axis=-1)
  if image.ndim != 3 or image.shape[-1] not in (3, 4):
    raise UserError(f"images must be [H, W, 3] (RGB) or [H, W, 4]; got shape "
                    f"{list(image.shape)}")
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
