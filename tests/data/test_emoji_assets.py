"""The emoji catalogue: named, deterministic, near-duplicates last."""
import numpy as np

from unclip_jax.data import emoji_assets


def test_catalogue_has_about_3950_uniquely_named_images():
  entries = [entry for entry, _ in emoji_assets.catalogue()]
  assert 3900 <= len(entries) <= 4000
  assert len({e.name for e in entries}) == len(entries)
  assert any(e.name == "red apple" and e.filename == "1f34e.png" for e in entries)


def test_select_emoji_is_deterministic_nested_and_plain_when_small():
  eight = emoji_assets.select_emoji(8, seed=0)
  assert eight == emoji_assets.select_emoji(8, seed=0)
  assert emoji_assets.select_emoji(4, seed=0) == eight[:4]
  assert emoji_assets.select_emoji(8, seed=1) != eight
  for entry in emoji_assets.select_emoji(256, seed=0):
    codepoints = entry.filename[:-4].split("-")
    assert len(codepoints) == 1 or "20e3" in codepoints, entry  # No skin tones, no ZWJ.
  assert len(emoji_assets.select_emoji(None)) == len(emoji_assets.catalogue())


def test_load_rgba_is_72x72_rgba():
  rgba = emoji_assets.load_rgba(emoji_assets.select_emoji(1)[0])
  assert rgba.shape == (72, 72, 4) and rgba.dtype == np.uint8
  assert 0 < (rgba[..., 3] > 0).mean() < 1
