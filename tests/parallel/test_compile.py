"""Ahead-of-time compilation for a TPU slice on this CPU host: TPU names, and
`python -m unclip_jax.compile` on a tiny config for a 4-chip v5e (fits: exit
0; squeezed into 1 MiB of HBM: exit 1)."""
import os
import subprocess
import sys

import pytest

from unclip_jax.errors import UserError
from unclip_jax.parallel import topologies

COMMAND = [sys.executable, "-m", "unclip_jax.compile",
           "--config", "configs/upsampler.py:tiny", "--topology", "v5e-4",
           "--mesh", "2,2,1"]
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(__file__)))


@pytest.mark.parametrize("name, grid, chips, kind", [
    ("v5p-256", (4, 4, 8), 128, "v5"), ("v4-8", (2, 2, 1), 4, "v4"),
    ("v5e-16", (4, 4), 16, "v5e"), ("v6e-256", (16, 16), 256, "v6e"),
    ("v5p:4x4x12", (4, 4, 12), 192, "v5")])
def test_slices_by_cloud_name_or_chip_grid(name, grid, chips, kind):
  topology = topologies.parse(name)
  assert (topology.grid, topology.num_chips) == (grid, chips)
  assert topology.topology_name.startswith(kind + ":")


@pytest.mark.parametrize("name", ["v5p-6", "v3-8", "v5e:4x4x4", "v5e-24"])
def test_bad_slice_names_are_one_line_errors(name):
  with pytest.raises(UserError):
    topologies.parse(name)


def test_tiny_config_compiles_for_a_v5e_slice():
  pytest.importorskip("libtpu")
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  runs = [subprocess.Popen(COMMAND + extra, cwd=ROOT, env=env, text=True,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
          for extra in ([], ["--hbm_gib", "0.001"])]
  (fits, _), (squeezed, _) = (run.communicate(timeout=300) for run in runs)
  assert runs[0].returncode == 0, fits
  assert "mesh data 2 x fsdp 2 x tensor 1" in fits
  assert "fits" in fits and "temporaries" in fits and "FLOPs per step" in fits
  assert runs[1].returncode == 1, squeezed
  assert "does NOT fit" in squeezed
