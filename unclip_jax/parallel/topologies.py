"""TPU slices by their Cloud names ("v5p-256", "v5e-16", "v4-8", "v6e-64") or
by chip grid ("v5p:4x4x8"), as compile-only devices for ahead-of-time
compilation on a host without TPUs (`jax.experimental.topologies`, as
MaxText's train_compile.py).

In v4 and v5p names the number counts TensorCores, two per chip, and each chip
is one jax device (megacore); in v5e and v6e names it counts chips.
"""
import dataclasses
import math
import os
import re

from unclip_jax.errors import UserError


@dataclasses.dataclass(frozen=True)
class ChipKind:
  prefix: str  # libtpu's topology prefix
  hbm_bytes: int  # per chip
  peak_flops: float  # dense bf16 FLOP/s per chip
  cores_per_chip: int  # how the Cloud name counts a chip
  dims: int  # 3-D torus (v4, v5p) or 2-D (v5e, v6e)
  chip_config: str  # "megacore": one jax device per chip


GIB = 2**30
CHIPS = {
    "v4": ChipKind("v4", 32 * GIB, 275e12, 2, 3, "megacore"),
    "v5p": ChipKind("v5", 95 * GIB, 459e12, 2, 3, "megacore"),
    "v5e": ChipKind("v5e", 16 * GIB, 197e12, 1, 2, "default"),
    "v6e": ChipKind("v6e", 32 * GIB, 918e12, 1, 2, "default"),
}


@dataclasses.dataclass(frozen=True)
class Topology:
  name: str  # as given
  kind: str  # "v4" | "v5p" | "v5e" | "v6e"
  grid: tuple[int, ...]  # chips per torus dimension
  num_slices: int = 1

  @property
  def chip(self) -> ChipKind:
    return CHIPS[self.kind]

  @property
  def num_chips(self) -> int:
    return math.prod(self.grid) * self.num_slices

  @property
  def topology_name(self) -> str:
    return f"{self.chip.prefix}:{'x'.join(map(str, self.grid))}"

  @property
  def accelerator_type(self) -> str:
    """The Cloud accelerator type, e.g. v5p-256 or v5litepod-16."""
    cores = math.prod(self.grid) * self.chip.cores_per_chip
    return f"{'v5litepod' if self.kind == 'v5e' else self.kind}-{cores}"

  @property
  def host_bounds(self) -> tuple[int, int, int]:
    """Chips per host: 2x2 (four chips) on every kind, fewer on tiny slices."""
    grid = tuple(self.grid) + (1,) * (3 - len(self.grid))
    return (min(2, grid[0]), min(2, grid[1]), 1)


def default_grid(chips: int, dims: int) -> tuple[int, ...]:
  """The usual torus for a power-of-two chip count: from 2x2x1 (3-D) or 1x1
  (2-D), double the smallest dimension, the last of equals: 128 chips ->
  4x4x8, 64 -> 8x8 (the grids of MaxText's accelerator table)."""
  grid = [2, 2, 1] if dims == 3 and chips >= 4 else [1] * dims
  while math.prod(grid) < chips:
    smallest = min(grid)
    grid[max(i for i, g in enumerate(grid) if g == smallest)] *= 2
  if math.prod(grid) != chips:
    raise UserError(f"{chips} chips is not a power of two; give the chip "
                    "grid, e.g. --topology v5p:4x4x12")
  return tuple(grid)


def parse(name: str, num_slices: int = 1) -> Topology:
  """'v5p-256' (Cloud name) or 'v5p:4x4x8' (chip grid) -> Topology."""
  match = re.fullmatch(r"(v4|v5p|v5e|v6e)([-:])([0-9x]+)", name.strip())
  if not match:
    raise UserError(f"--topology={name!r}: use a Cloud TPU name such as "
                    f"v5p-256, v5e-16, v4-8, v6e-64, or a chip grid such as "
                    f"v5p:4x4x8; kinds {sorted(CHIPS)}")
  kind, separator, size = match.groups()
  chip = CHIPS[kind]
  if separator == ":":
    grid = tuple(int(g) for g in size.split("x"))
    if len(grid) != chip.dims or min(grid) < 1:
      raise UserError(f"--topology={name!r}: a {kind} grid has {chip.dims} "
                      "dimensions, e.g. " + ("4x4x8" if chip.dims == 3 else "8x8"))
  else:
    cores = int(size)
    if cores % chip.cores_per_chip:
      raise UserError(f"--topology={name!r}: {kind} names count "
                      f"{chip.cores_per_chip} cores per chip; use a multiple")
    grid = default_grid(cores // chip.cores_per_chip, chip.dims)
  if num_slices < 1:
    raise UserError(f"--num_slices={num_slices} must be >= 1")
  return Topology(name=name, kind=kind, grid=grid, num_slices=num_slices)


def compile_only_devices(topology: Topology) -> list:
  """The slice's devices as compile-only jax devices (needs libtpu)."""
  # Read when libtpu loads. A CPU host has no TPU metadata server to ask, no
  # workers to find and no chip to lock; the slice type stops its warnings.
  os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
  os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  os.environ.setdefault("TPU_ACCELERATOR_TYPE", topology.accelerator_type)
  try:
    from jax.experimental.topologies import get_topology_desc
    description = get_topology_desc(
        platform="tpu", topology_name=topology.topology_name,
        chip_config_name=topology.chip.chip_config,
        chips_per_host_bounds=topology.host_bounds,
        num_slices=topology.num_slices)
  except (ImportError, RuntimeError) as e:
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise UserError(f"cannot describe TPU topology {topology.topology_name} "
                    f"({first}); install libtpu with pip install -e '.[tpu]'"
                    ) from None
  return list(description.devices)
