"""Scenes for the `emoji_scenes` dataset: one emoji on a solid colour, at one of 5 places.

The caption grammar, colours and positions are a contract (DESIGN.md, "The bundled data";
docs/data.md): evaluation parses captions, and prompts are written against them.

As a command, writes the scene a caption describes to a PNG (e.g. an input for the
image manipulations, docs/sampling.md):

  python -m unclip_jax.data.scenes --caption "fire on a blue background in the center" \
      --out scene.png [--resolution 64]
"""
from __future__ import annotations

import difflib
import functools
import os
import re

import numpy as np
from PIL import Image

from unclip_jax.data import emoji_assets
from unclip_jax.errors import UserError

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "orange": (245, 140, 30),
    "yellow": (240, 220, 40),
    "green": (40, 170, 70),
    "blue": (40, 90, 220),
    "purple": (140, 60, 190),
    "pink": (240, 130, 180),
    "brown": (130, 80, 40),
    "black": (20, 20, 20),
    "white": (245, 245, 245),
    "gray": (128, 128, 128),
}
POSITIONS: tuple[str, ...] = ("top left", "top right", "bottom left", "bottom right", "center")
COLOR_NAMES: tuple[str, ...] = tuple(COLORS)

# Centre of the emoji as a fraction of the image side, (row, column).
_CENTRES = {
    "top left": (0.25, 0.25),
    "top right": (0.25, 0.75),
    "bottom left": (0.75, 0.25),
    "bottom right": (0.75, 0.75),
    "center": (0.5, 0.5),
}
_ON_WHITE = (255, 255, 255)


def caption(name: str, color: str, position: str) -> str:
  """'red apple', 'blue', 'top left' -> 'red apple on a blue background in the top left'."""
  return f"{name} on a {color} background in the {position}"


def _resize_premultiplied(rgba: np.ndarray, size: int) -> np.ndarray:
  """uint8 [h, w, 4] -> float32 [size, size, 4] premultiplied RGBA in [0, 1].

  Resizing straight RGBA bleeds the (arbitrary) colour of transparent pixels into the
  edges; premultiplying first makes those pixels black with zero weight, as they should be.
  """
  straight = rgba.astype(np.float32) / 255.0
  alpha = straight[..., 3:]
  premultiplied = np.concatenate([straight[..., :3] * alpha, alpha], axis=-1)
  channels = [
      np.asarray(Image.fromarray(np.ascontiguousarray(premultiplied[..., c]), mode="F")
                 .resize((size, size), Image.Resampling.LANCZOS))
      for c in range(4)
  ]
  resized = np.stack(channels, axis=-1)
  # Lanczos rings a little past the edges; clip to a valid premultiplied colour.
  alpha = np.clip(resized[..., 3:], 0.0, 1.0)
  return np.concatenate([np.clip(resized[..., :3], 0.0, alpha), alpha], axis=-1)


@functools.lru_cache(maxsize=8)
def _resized_cached(rgba_bytes: bytes, shape: tuple[int, ...], size: int) -> np.ndarray:
  # One emoji appears in 55 scenes at the same size, generated one after another (the
  # triples are sorted by emoji): resize it once. Small, as entries grow with resolution.
  rgba = np.frombuffer(rgba_bytes, np.uint8).reshape(shape)
  return _resize_premultiplied(rgba, size)


def _composite(rgba: np.ndarray, background, size: int, top: int, left: int,
               resolution: int) -> np.ndarray:
  """Alpha-composites `rgba` resized to `size` at (top, left) on a solid background."""
  foreground = _resized_cached(rgba.tobytes(), rgba.shape, size)
  canvas = np.empty((resolution, resolution, 3), np.float32)
  canvas[:] = np.asarray(background, np.float32) / 255.0
  window = canvas[top:top + size, left:left + size]
  window[:] = foreground[..., :3] + window * (1.0 - foreground[..., 3:])
  return np.round(canvas * 255.0).astype(np.uint8)


def emoji_box(position: str, resolution: int) -> tuple[int, int, int]:
  """(top, left, size) of the emoji: half the side, centred in its quarter or the middle."""
  size = resolution // 2
  row, column = _CENTRES[position]
  top = int(round(row * resolution - size / 2))
  left = int(round(column * resolution - size / 2))
  return top, left, size


def compose_scene(rgba: np.ndarray, color: str, position: str, resolution: int) -> np.ndarray:
  """The emoji (uint8 [h, w, 4]) on a `color` background at `position`: uint8 [R, R, 3]."""
  top, left, size = emoji_box(position, resolution)
  return _composite(rgba, COLORS[color], size, top, left, resolution)


def emoji_on_white(rgba: np.ndarray, resolution: int) -> np.ndarray:
  """The emoji (uint8 [h, w, 4]) filling a white square: uint8 [R, R, 3]."""
  return _composite(rgba, _ON_WHITE, resolution, 0, 0, resolution)


def split_combinations(num_emoji: int, seed: int, test_fraction: float = 0.2):
  """Splits every (emoji_index, color_index, position_index) into (train, test) lists.

  About `test_fraction` of the combinations are held out, chosen by `seed`, but never the
  last training example of an emoji, colour or position: every part is seen in training,
  so the test split measures new combinations of known parts. Both lists are sorted.
  """
  num_colors, num_positions = len(COLORS), len(POSITIONS)
  triples = [(e, c, p) for e in range(num_emoji) for c in range(num_colors)
             for p in range(num_positions)]
  target = int(round(test_fraction * len(triples)))
  emoji_left = np.full(num_emoji, num_colors * num_positions)
  colors_left = np.full(num_colors, num_emoji * num_positions)
  positions_left = np.full(num_positions, num_emoji * num_colors)
  held_out = set()
  for index in np.random.default_rng(seed).permutation(len(triples)):
    if len(held_out) == target:
      break
    e, c, p = triples[index]
    if min(emoji_left[e], colors_left[c], positions_left[p]) > 1:
      held_out.add(triples[index])
      emoji_left[e] -= 1
      colors_left[c] -= 1
      positions_left[p] -= 1
  train = [t for t in triples if t not in held_out]
  return train, sorted(held_out)


# The command: one caption's scene as a PNG.

_CAPTION = re.compile(
    r"(?P<name>.+) on an? (?P<color>\S+) background in the (?P<position>.+)")
# The pipeline refuses images under 8 px (data/images.py); the top is a sanity bound.
SIDE_RANGE = (8, 1024)


def parse_caption(text: str) -> tuple[emoji_assets.EmojiEntry, str, str]:
  """'fire on a blue background in the center' -> (fire's entry, 'blue', 'center');
  a UserError naming the fix for what the grammar or the bundled emoji lack."""
  match = _CAPTION.fullmatch(" ".join(text.split()))
  if not match:
    raise UserError(
        f"caption {text!r} does not read '<emoji> on a <colour> background in the "
        f"<position>'; write it that way, e.g. {caption('fire', 'blue', 'center')!r}")
  name, color, position = match.group("name", "color", "position")
  if color not in COLORS:
    raise UserError(f"{color!r} is not a background colour; use one of "
                    f"{', '.join(COLOR_NAMES)}")
  if position not in POSITIONS:
    raise UserError(f"{position!r} is not a position; use one of "
                    f"{', '.join(POSITIONS)}")
  entries = {entry.name: entry for entry, _ in emoji_assets.catalogue()}
  if name not in entries:
    close = difflib.get_close_matches(name, list(entries), n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise UserError(f"no bundled emoji is named {name!r}{hint}; name one by its "
                    "English emoji name, e.g. 'fire'")
  return entries[name], color, position


def write_scene(text: str, path: str, resolution: int) -> None:
  """Writes the scene `text` describes, rendered as the data sets render it, to
  the image file `path` (its folder made if missing)."""
  low, high = SIDE_RANGE
  if not low <= resolution <= high:
    raise UserError(f"--resolution={resolution}: must be in [{low}, {high}]")
  if os.path.isdir(path):
    raise UserError(f"--out={path} is a folder; pass a file name ending in .png")
  if os.path.splitext(path)[1].lower() not in Image.registered_extensions():
    raise UserError(f"cannot tell an image format from {path!r}; end --out in .png")
  entry, color, position = parse_caption(text)
  image = compose_scene(emoji_assets.load_rgba(entry), color, position, resolution)
  try:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    Image.fromarray(image).save(path)
  except OSError as e:
    raise UserError(f"cannot write {path} ({e.strerror or e}); pass --out a "
                    "writable path") from None


def main(argv):
  del argv
  from absl import flags  # pylint: disable=import-outside-toplevel
  values = flags.FLAGS
  write_scene(values.caption, values.out, values.resolution)
  print(values.out)


if __name__ == "__main__":
  # Defined here, not on import: the library part is imported by commands that
  # have flags of the same names.
  from absl import flags  # pylint: disable=ungrouped-imports
  from unclip_jax import cli
  flags.DEFINE_string("caption", None, "'<emoji> on a <colour> background in the "
                      "<position>', e.g. 'fire on a blue background in the center'")
  flags.DEFINE_string("out", None, "the PNG to write")
  flags.DEFINE_integer("resolution", 64, "the image side in pixels")
  flags.mark_flags_as_required(["caption", "out"])
  cli.run(main)
