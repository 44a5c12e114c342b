"""Scene composition, caption grammar and the held-out combinations."""
import numpy as np
import pytest
from PIL import Image

from unclip_jax.data import emoji_assets, scenes
from unclip_jax.errors import UserError

RESOLUTION = 32


def _apple():
  return emoji_assets.load_rgba(
      next(e for e, _ in emoji_assets.catalogue() if e.name == "red apple"))


def test_colours_and_positions_are_the_designed_ones():
  assert scenes.COLORS == {
      "red": (220, 40, 40), "orange": (245, 140, 30), "yellow": (240, 220, 40),
      "green": (40, 170, 70), "blue": (40, 90, 220), "purple": (140, 60, 190),
      "pink": (240, 130, 180), "brown": (130, 80, 40), "black": (20, 20, 20),
      "white": (245, 245, 245), "gray": (128, 128, 128)}
  assert scenes.POSITIONS == (
      "top left", "top right", "bottom left", "bottom right", "center")


def test_caption_grammar():
  assert (scenes.caption("red apple", "blue", "top left")
          == "red apple on a blue background in the top left")


@pytest.mark.parametrize("position", scenes.POSITIONS)
def test_emoji_lands_in_its_quarter_on_the_background(position):
  image = scenes.compose_scene(_apple(), "blue", position, RESOLUTION)
  assert image.shape == (RESOLUTION, RESOLUTION, 3) and image.dtype == np.uint8
  foreground = np.any(image != scenes.COLORS["blue"], axis=-1)
  rows, columns = np.nonzero(foreground)
  centroid = np.array([rows.mean(), columns.mean()]) + 0.5  # Pixel centres.
  expected = {"top left": (8, 8), "top right": (8, 24), "bottom left": (24, 8),
              "bottom right": (24, 24), "center": (16, 16)}[position]
  np.testing.assert_allclose(centroid, expected, atol=3)
  top, left, size = scenes.emoji_box(position, RESOLUTION)
  assert size == RESOLUTION // 2
  outside = np.ones_like(foreground)
  outside[top:top + size, left:left + size] = False
  assert not foreground[outside].any()  # Everything outside the emoji is background.
  if position == "center":
    border = np.concatenate([image[0], image[-1], image[:, 0], image[:, -1]])
    assert (border == scenes.COLORS["blue"]).all()


def test_transparent_pixels_do_not_bleed_their_colour():
  rgba = np.zeros((72, 72, 4), np.uint8)
  rgba[..., 1] = 255  # Fully transparent green: must leave no trace.
  rgba[18:54, 18:54] = (200, 0, 0, 255)
  image = scenes.compose_scene(rgba, "white", "center", 48).astype(int)
  assert (image[..., 1] <= image[..., 2]).all()  # No pixel greener than it is blue.
  on_white = scenes.emoji_on_white(rgba, 48).astype(int)
  assert (on_white[0, 0] == 255).all() and (on_white[24, 24] == (200, 0, 0)).all()


def test_split_combinations_is_disjoint_complete_and_seeded():
  train, test = scenes.split_combinations(8, seed=0)
  assert set(train).isdisjoint(test)
  assert len(train) + len(test) == 8 * 11 * 5
  assert len(test) == round(0.2 * 8 * 11 * 5)
  assert (train, test) == scenes.split_combinations(8, seed=0)
  assert test != scenes.split_combinations(8, seed=1)[1]
  for axis, count in enumerate((8, 11, 5)):
    assert {t[axis] for t in train} == set(range(count))


def test_split_combinations_keeps_every_part_even_for_one_emoji():
  train, test = scenes.split_combinations(1, seed=3, test_fraction=0.5)
  assert {t[1] for t in train} == set(range(11)) and {t[2] for t in train} == set(range(5))
  assert test


def test_the_command_writes_the_scene_a_caption_describes(tmp_path):
  path = tmp_path / "new folder" / "scene.png"
  scenes.write_scene("red apple on a blue background in the  top left", str(path), 16)
  assert np.array_equal(np.asarray(Image.open(path)),
                        scenes.compose_scene(_apple(), "blue", "top left", 16))
  with pytest.raises(UserError, match="end --out in .png"):
    scenes.write_scene("fire on a red background in the center",
                       str(tmp_path / "s.unknown"), 16)


@pytest.mark.parametrize("caption, resolution, message", [
    ("red aple on a blue background in the center", 16,
     "no bundled emoji is named 'red aple' (did you mean 'red apple'?)"),
    ("red apple on a teal background in the center", 16,
     "'teal' is not a background colour; use one of red, orange"),
    ("red apple on a blue background in the middle", 16,
     "'middle' is not a position; use one of top left"),
    ("a red apple", 16, "does not read '<emoji> on a <colour> background in the"),
    ("red apple on a blue background in the center", 4,
     "--resolution=4: must be in [8, 1024]"),
])
def test_the_command_refuses_bad_input_in_one_line(tmp_path, caption, resolution,
                                                   message):
  with pytest.raises(UserError) as raised:
    scenes.write_scene(caption, str(tmp_path / "s.png"), resolution)
  assert message in str(raised.value) and "\n" not in str(raised.value)
