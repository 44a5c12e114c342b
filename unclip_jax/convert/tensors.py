"""Source checkpoints as named numpy tensors, every one accounted for.

A converter takes tensors out of a `TensorSource` by name (`take`); `finish()`
then fails on any tensor it never took. So a key renamed in a new release of the
source library, or a checkpoint of another size, is one `ConversionError` naming
the key, never a model that silently runs on random weights.
"""
import os
from typing import Iterable, Mapping, Sequence

import numpy as np

from unclip_jax.errors import ConversionError


def read_state_dict(path: str) -> dict[str, np.ndarray]:
  """A checkpoint file's tensors as float32/int numpy arrays.

  `.safetensors` is read without torch; a pickled torch file (`.bin`, `.pt`,
  `.pth`) needs torch installed and is opened with `weights_only=True` (no code
  in the file runs).
  """
  if not os.path.isfile(path):
    raise ConversionError(f"no checkpoint file at {path}")
  if path.endswith(".safetensors"):
    from safetensors.numpy import load_file
    return {k: _as_numpy(v) for k, v in load_file(path).items()}
  try:
    import torch
  except ImportError:
    raise ConversionError(f"{path} is a torch pickle: install torch to read it, or "
                          "convert it to .safetensors first") from None
  state = torch.load(path, map_location="cpu", weights_only=True)
  if isinstance(state, Mapping) and "state_dict" in state:
    state = state["state_dict"]
  return {k: _as_numpy(v.float() if v.is_floating_point() else v)
          for k, v in state.items()}


def _as_numpy(value) -> np.ndarray:
  array = np.asarray(value)
  if array.dtype.kind == "f" or array.dtype.name == "bfloat16":
    return array.astype(np.float32)
  return array


class TensorSource:
  """Named tensors that must each be taken exactly once.

  `prefix` scopes a view (`source.scope("text_model.")`) that shares the
  accounting with its parent.
  """

  def __init__(self, tensors: Mapping[str, np.ndarray], origin: str = "checkpoint",
               *, _taken: set | None = None, _prefix: str = ""):
    self._tensors = tensors
    self.origin = origin
    self._taken = set() if _taken is None else _taken
    self._prefix = _prefix

  def scope(self, prefix: str) -> "TensorSource":
    return TensorSource(self._tensors, self.origin, _taken=self._taken,
                        _prefix=self._prefix + prefix)

  def has(self, name: str) -> bool:
    return self._prefix + name in self._tensors

  def take(self, name: str, shape: Sequence[int] | None = None) -> np.ndarray:
    """The tensor `name` (under this view's prefix), checked against `shape`."""
    key = self._prefix + name
    if key not in self._tensors:
      raise ConversionError(f"{self.origin} has no tensor {key!r}: the checkpoint is "
                            "not of the architecture its config describes")
    if key in self._taken:
      raise ConversionError(f"tensor {key!r} of {self.origin} was read twice")
    value = self._tensors[key]
    if shape is not None and tuple(value.shape) != tuple(shape):
      raise ConversionError(f"tensor {key!r} of {self.origin} has shape "
                            f"{tuple(value.shape)}, the config needs {tuple(shape)}")
    self._taken.add(key)
    return value

  def skip(self, names: Iterable[str]) -> None:
    """Marks tensors that carry no weights (buffers such as position ids)."""
    for name in names:
      if self._prefix + name in self._tensors:
        self._taken.add(self._prefix + name)

  def unused(self) -> list[str]:
    return sorted(k for k in self._tensors if k.startswith(self._prefix)
                  and k not in self._taken)

  def finish(self) -> None:
    """Fails if any tensor under this view was never taken."""
    left = self.unused()
    if left:
      more = f" (and {len(left) - 5} more)" if len(left) > 5 else ""
      raise ConversionError(f"{self.origin} has {len(left)} tensor(s) the converter "
                            f"did not use: {', '.join(left[:5])}{more}; the "
                            "checkpoint is not of the architecture its config describes")


# torch layouts -> flax layouts.
def linear_kernel(weight: np.ndarray) -> np.ndarray:
  """torch Linear weight [out, in] -> flax Dense kernel [in, out]."""
  return np.ascontiguousarray(weight.T)


def conv_kernel(weight: np.ndarray) -> np.ndarray:
  """torch Conv2d weight [out, in, kh, kw] -> flax Conv kernel [kh, kw, in, out]."""
  return np.ascontiguousarray(weight.transpose(2, 3, 1, 0))
