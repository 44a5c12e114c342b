"""Columns on disk: what is appended reads back, ragged rows included, and a short
or missing file is named before anything is read."""
import os

import numpy as np
import pytest

from unclip_jax.data import columns


def _write(directory, pieces, rows):
  writer = columns.ColumnWriter(str(directory))
  for start in range(0, len(rows), 2):  # in batches, as the cache builder appends
    writer.append("rows", rows[start:start + 2])
    writer.append_ragged("ragged", pieces[start:start + 2])
  writer.close()
  return writer.layout


def test_fixed_and_ragged_columns_read_back(tmp_path):
  rng = np.random.default_rng(0)
  lengths = [3, 0, 5, 1, 2]  # an example with no rows, and one past the width
  pieces = [rng.normal(size=(n, 2)).astype(np.float16) for n in lengths]
  rows = rng.integers(0, 100, (5, 3)).astype(np.int32)
  layout = _write(tmp_path, pieces, rows)
  assert layout["ragged"] == {"dtype": "<f2", "shape": [11, 2]}
  assert layout["ragged" + columns.END]["shape"] == [5]
  opened = columns.open_columns(str(tmp_path), layout)
  indices = np.array([4, 1, 2, 2, 0])  # any order, repeats allowed
  np.testing.assert_array_equal(opened["rows"][indices], rows[indices])
  padded, real = columns.gather_padded(opened["ragged"], opened["ragged_end"], indices, 4)
  assert padded.shape == (5, 4, 2) and padded.dtype == np.float16
  for row, index in enumerate(indices):
    kept = min(lengths[index], 4)
    np.testing.assert_array_equal(real[row], np.arange(4) < kept)
    np.testing.assert_array_equal(padded[row, :kept], pieces[index][:kept])
    assert not padded[row, kept:].any()


def test_strings_read_back(tmp_path):
  texts = ["red apple", "", "café ☕", "x"]
  writer = columns.ColumnWriter(str(tmp_path))
  writer.append_ragged("text", [np.frombuffer(t.encode(), np.uint8) for t in texts])
  writer.close()
  opened = columns.open_columns(str(tmp_path), writer.layout)
  got = columns.gather_strings(opened["text"], opened["text_end"], np.array([2, 1, 0, 3]))
  assert got.dtype == object and list(got) == ["café ☕", "", "red apple", "x"]


def test_rows_of_another_shape_are_refused(tmp_path):
  writer = columns.ColumnWriter(str(tmp_path))
  writer.append("rows", np.zeros((2, 3), np.float32))
  with pytest.raises(ValueError, match="rows of shape"):
    writer.append("rows", np.zeros((2, 4), np.float32))
  writer.close()


def test_short_or_missing_files_are_named(tmp_path):
  layout = _write(tmp_path, [np.zeros((1, 2), np.float16)] * 4,
                  np.zeros((4, 3), np.int32))
  assert columns.problem(str(tmp_path), layout) is None
  with open(os.path.join(tmp_path, "ragged.bin"), "r+b") as f:
    f.truncate(3)
  assert "ragged.bin holds 3 bytes" in columns.problem(str(tmp_path), layout)
  os.remove(os.path.join(tmp_path, "rows.bin"))
  assert "rows.bin is missing" in columns.problem(str(tmp_path), layout)
  with pytest.raises(ValueError, match="is missing"):
    columns.open_columns(str(tmp_path), layout)


def test_an_empty_column_opens(tmp_path):
  writer = columns.ColumnWriter(str(tmp_path))
  writer.append_ragged("text", [np.zeros(0, np.uint8)] * 3)
  writer.close()
  opened = columns.open_columns(str(tmp_path), writer.layout)
  assert list(columns.gather_strings(opened["text"], opened["text_end"],
                                     np.arange(3))) == ["", "", ""]
