"""PNG grids: the size and the tiles read back."""
import numpy as np
import pytest
from PIL import Image

from unclip_jax.data import images as grid


def _images(count, side=8):
  rng = np.random.default_rng(0)
  return rng.integers(0, 256, (count, side, side, 3), dtype=np.uint8)


def test_round_trip(tmp_path):
  images = _images(6)
  path = grid.write_grid(str(tmp_path / "deep" / "grid.png"), images, rows=2, cols=3)
  read = np.asarray(Image.open(path))
  pad = 2
  assert read.shape == (2 * (8 + pad) + pad, 3 * (8 + pad) + pad, 3)
  # Row 1, column 2 is image 5.
  top, left = pad + (8 + pad), pad + 2 * (8 + pad)
  np.testing.assert_array_equal(read[top:top + 8, left:left + 8], images[5])


def test_labels_widen_and_missing_tiles_stay_white():
  plain = grid.make_grid(_images(3), rows=2, cols=2)
  labelled = grid.make_grid(_images(3), rows=2, cols=2, labels=["a", "b"])
  assert labelled.shape[0] == plain.shape[0] and labelled.shape[1] > plain.shape[1]
  assert (plain[12:20, 12:20] == 255).all()  # the 4th tile


def test_rejects_float_and_overflow():
  with pytest.raises(ValueError, match="uint8"):
    grid.make_grid(np.zeros((2, 4, 4, 3), np.float32), rows=1)
  with pytest.raises(ValueError, match="do not fit"):
    grid.make_grid(_images(5), rows=2, cols=2)


def test_to_uint8_and_nearest_upscale():
  np.testing.assert_array_equal(grid.to_uint8(np.array([-1.5, -1.0, 0.0, 1.0])),
                                [0, 0, 128, 255])
  up = grid.nearest_upscale(_images(1, side=2), 3)
  assert up.shape == (1, 6, 6, 3)
  np.testing.assert_array_equal(up[0, :3, :3], np.broadcast_to(up[0, 0, 0], (3, 3, 3)))
