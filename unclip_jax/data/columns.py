"""A data set stored as columns: one flat binary file per field, memory-mapped to read.

A column holds one field of every example, rows back to back in `<name>.bin`; its
dtype and shape are kept in a layout (a dict the caller stores, e.g. in a manifest).
A ragged column (a different number of rows per example: a caption's UTF-8 bytes,
its tokens' encodings) also has `<name>_end`, int64 [N]: where example i's rows end.

Reading a batch of any examples is one fancy index per column into the page cache,
where a file of records costs a decode per example: at a batch of 128 that was a
third of the prior's step on two cores.
"""
import os
from typing import Sequence

import numpy as np

SUFFIX = ".bin"
END = "_end"  # the column of a ragged column's row ends

Layout = dict[str, dict]  # column name -> {"dtype": numpy dtype str, "shape": [...]}


def file_name(column: str) -> str:
  return column + SUFFIX


class ColumnWriter:
  """Appends the fields of examples to columns in `directory`, streaming."""

  def __init__(self, directory: str):
    self.directory = directory
    self.layout: Layout = {}
    self._files = {}

  def append(self, name: str, rows: np.ndarray) -> None:
    """Rows [n, ...] of column `name`, every row of one dtype and shape."""
    rows = np.ascontiguousarray(rows)
    spec = self.layout.setdefault(
        name, {"dtype": rows.dtype.str, "shape": [0, *rows.shape[1:]]})
    if spec["dtype"] != rows.dtype.str or spec["shape"][1:] != list(rows.shape[1:]):
      raise ValueError(f"column {name!r} holds {spec['dtype']} rows of shape "
                       f"{spec['shape'][1:]}, not {rows.dtype.str} {list(rows.shape[1:])}")
    if name not in self._files:
      self._files[name] = open(os.path.join(self.directory, file_name(name)), "wb")
    self._files[name].write(rows.tobytes())
    spec["shape"][0] += len(rows)

  def append_ragged(self, name: str, pieces: Sequence[np.ndarray]) -> None:
    """One piece [rows_i, ...] per example: its rows of ragged column `name`."""
    if not pieces:
      return
    done = self.layout[name]["shape"][0] if name in self.layout else 0
    ends = done + np.cumsum([len(piece) for piece in pieces], dtype=np.int64)
    self.append(name, np.concatenate(pieces))
    self.append(name + END, ends)

  def close(self) -> list[str]:
    """Closes the files; returns their paths (for the caller to flush to disk)."""
    for file in self._files.values():
      file.close()
    return [file.name for file in self._files.values()]


def _size(spec: dict) -> int:
  return int(np.prod(spec["shape"])) * np.dtype(spec["dtype"]).itemsize


def problem(directory: str, layout: Layout) -> str | None:
  """What keeps the columns in `directory` from being read as `layout` (None: nothing)."""
  for name, spec in layout.items():
    path = os.path.join(directory, file_name(name))
    if not os.path.exists(path):
      return f"its column {file_name(name)} is missing"
    if os.path.getsize(path) != _size(spec):
      return (f"its column {file_name(name)} holds {os.path.getsize(path)} bytes, "
              f"not the {_size(spec)} of {spec['dtype']}{spec['shape']}")
  return None


def open_columns(directory: str, layout: Layout) -> dict[str, np.ndarray]:
  """Every column of `layout`, memory-mapped read-only (nothing is read yet)."""
  if (reason := problem(directory, layout)) is not None:
    raise ValueError(f"{directory}: {reason}")

  def open_one(name, spec):
    shape, dtype = tuple(spec["shape"]), np.dtype(spec["dtype"])
    if _size(spec) == 0:  # mmap refuses empty files
      return np.zeros(shape, dtype)
    return np.memmap(os.path.join(directory, file_name(name)), dtype, "r", shape=shape)

  return {name: open_one(name, spec) for name, spec in layout.items()}


def _starts_and_ends(ends: np.ndarray, indices: np.ndarray):
  stop = np.asarray(ends[indices], np.int64)
  start = np.where(indices > 0, ends[np.maximum(indices - 1, 0)], 0).astype(np.int64)
  return start, stop


def gather_padded(data: np.ndarray, ends: np.ndarray, indices: np.ndarray,
                  width: int) -> tuple[np.ndarray, np.ndarray]:
  """Examples `indices` of a ragged column as ([b, width, ...] zero-padded rows,
  bool [b, width] marking the real ones); rows past `width` are dropped."""
  start, stop = _starts_and_ends(ends, indices)
  real = np.arange(width) < (stop - start)[:, None]
  rows = (start[:, None] + np.arange(width))[real]
  padded = np.zeros((len(indices), width, *data.shape[1:]), data.dtype)
  padded[real] = data[rows]
  return padded, real


def gather_strings(data: np.ndarray, ends: np.ndarray,
                   indices: np.ndarray) -> np.ndarray:
  """Examples `indices` of a ragged column of UTF-8 bytes: object [b] of str."""
  start, stop = _starts_and_ends(ends, indices)
  return np.array([bytes(data[a:b]).decode() for a, b in zip(start, stop)],
                  dtype=object)
