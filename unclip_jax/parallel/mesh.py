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


def resolve_shape(shape: Sequence[int], num_devices: int) -> tuple[int, ...]:
  """Fills the single -1 in `shape` so that the product is `num_devices`."""
  shape = tuple(int(s) for s in shape)
  if len(shape) != len(MESH_AXES):
    raise ValueError(f"mesh shape {shape} must have {len(MESH_AXES)} entries "
                     f"for axes {MESH_AXES}; set --config.mesh.shape")
  if shape.count(-1) > 1 or any(s == 0 or s < -1 for s in shape):
    raise ValueError(f"mesh shape {shape}: use positive sizes and at most one "
                     "-1; set --config.mesh.shape")
  known = math.prod(s for s in shape if s != -1)
  if num_devices % known:
    raise ValueError(f"mesh shape {shape} does not divide {num_devices} devices;"
                     " set --config.mesh.shape so the sizes multiply to it")
  resolved = tuple(num_devices // known if s == -1 else s for s in shape)
  if math.prod(resolved) != num_devices:
    raise ValueError(f"mesh shape {shape} uses {math.prod(resolved)} of "
                     f"{num_devices} devices; put -1 on one axis or match "
                     "the device count")
  return resolved


def make_mesh(shape: Sequence[int] = (-1, 1, 1),
              dcn_shape: Sequence[int] = (1, 1, 1),
              devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A mesh over ('data', 'fsdp', 'tensor') with Auto (GSPMD) axis types."""
  devices = list(jax.devices() if devices is None else devices)
  dcn = resolve_shape(dcn_shape, max(1, len({d.slice_index for d in devices})
                                     if hasattr(devices[0], "slice_index")
                                     else 1))
  num_slices = math.prod(dcn)
  ici = resolve_shape(shape, len(devices) // num_slices)
  if num_slices > 1:
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
