"""The device mesh: ('data', 'fsdp', 'tensor'), sized from the config.

`mesh.shape` is the in-slice (ICI) parallelism and `mesh.dcn_shape` the
cross-slice (DCN) parallelism; their product per axis is the mesh axis size.
One entry of `shape` may be -1: it takes whatever devices are left.
"""
import math
from typing import Sequence

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh

from unclip_jax.parallel.axes import MESH_AXES


def resolve_shape(shape: Sequence[int], num_devices: int,
                  field: str = "mesh.shape", unit: str = "devices") -> tuple[int, ...]:
  """Fills the single -1 in `shape` so that the product is `num_devices`.

  `field` and `unit` name the config field and what it divides in errors
  (`mesh.dcn_shape` divides slices)."""
  fix, label = f"set --config.{field}", field.replace(".", " ")
  try:
    shape = tuple(int(s) for s in shape)
  except (TypeError, ValueError):
    raise ValueError(f"{label}={tuple(shape)!r}: use whole numbers; {fix}") from None
  if len(shape) != len(MESH_AXES):
    raise ValueError(f"{label} {shape} must have {len(MESH_AXES)} entries "
                     f"for axes {MESH_AXES}; {fix}")
  if shape.count(-1) > 1 or any(s == 0 or s < -1 for s in shape):
    raise ValueError(f"{label} {shape}: use positive sizes and at most one "
                     f"-1; {fix}")
  known = math.prod(s for s in shape if s != -1)
  if num_devices % known:
    raise ValueError(f"{label} {shape} does not divide {num_devices} {unit};"
                     f" {fix} so the sizes multiply to it")
  resolved = tuple(num_devices // known if s == -1 else s for s in shape)
  if math.prod(resolved) != num_devices:
    raise ValueError(f"{label} {shape} uses {math.prod(resolved)} of "
                     f"{num_devices} {unit}; put -1 on one axis or make the "
                     f"sizes multiply to {num_devices}")
  return resolved


def num_slices(devices: Sequence[jax.Device]) -> int:
  """Slices joined over DCN (1 without multi-slice devices, e.g. on a CPU)."""
  if not devices or not hasattr(devices[0], "slice_index"):
    return 1
  return max(1, len({d.slice_index for d in devices}))


def make_mesh(shape: Sequence[int] = (-1, 1, 1),
              dcn_shape: Sequence[int] = (1, 1, 1),
              devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A mesh over ('data', 'fsdp', 'tensor') with Auto (GSPMD) axis types."""
  devices = list(jax.devices() if devices is None else devices)
  dcn = resolve_shape(dcn_shape, num_slices(devices), "mesh.dcn_shape", "slices")
  ici = resolve_shape(shape, len(devices) // math.prod(dcn))
  if math.prod(dcn) > 1:
    device_array = mesh_utils.create_hybrid_device_mesh(
        ici, dcn, devices=devices, allow_split_physical_axes=True)
  else:
    try:
      device_array = mesh_utils.create_device_mesh(
          ici, devices=devices, allow_split_physical_axes=True)
    except (AssertionError, NotImplementedError, ValueError):
      device_array = np.asarray(devices).reshape(ici)
  return Mesh(device_array, MESH_AXES,
              axis_types=(AxisType.Auto,) * len(MESH_AXES))
