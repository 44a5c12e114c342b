"""Multi-host start-up: `jax.distributed.initialize` from the config or the
environment, before anything touches a device.

On one machine nothing is initialised and the same code runs: every host
reads its own shard of the data (data/pipeline.py), the loop assembles global
arrays with `jax.make_array_from_process_local_data`, orbax saves and restores
from every host, and only process 0 logs and writes files.

`config.distributed.initialize`:
  "auto"  initialise when the environment is a multi-process job: a
          coordinator address (config or JAX_COORDINATOR_ADDRESS), a Cloud TPU
          VM (jax reads the pod from its metadata), `srun` with more than one
          task (SLURM) or `mpirun` with more than one rank (Open MPI);
  "yes"   always (jax detects the cluster; fails outside a supported one);
  "no"    never.
"""
import glob
import importlib.util
import logging
import os

import jax
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

from unclip_jax.errors import ConfigError

log = logging.getLogger(__name__)

MODES = ("auto", "yes", "no")


GOOGLE_PCI_VENDOR = "0x1ae0"  # TPU chips appear as Google PCI devices


def on_cloud_tpu_vm() -> bool:
  """TPU chips on this host's PCI bus (as jax's own check), or a multi-host
  slice's workers listed by GKE in TPU_WORKER_HOSTNAMES."""
  for vendor_file in glob.glob("/sys/bus/pci/devices/*/vendor"):
    try:
      with open(vendor_file) as f:
        if f.read().strip() == GOOGLE_PCI_VENDOR:
          return True
    except OSError:
      continue
  return "," in os.environ.get("TPU_WORKER_HOSTNAMES", "")


def cpu_only_unless_accelerated(environ: dict) -> dict:
  """`environ` with JAX_PLATFORMS=cpu when the user set none, this host has no
  TPU chips and jax has no CUDA plugin: libtpu (the `test` extra installs it for
  ahead-of-time compilation) would otherwise probe for chips in every process,
  printing warnings, and processes side by side would contend for its lock file."""
  cuda = any(importlib.util.find_spec(name) for name in
             ("jax_cuda12_plugin", "jax_cuda13_plugin"))
  if environ.get("JAX_PLATFORMS") or cuda or on_cloud_tpu_vm():
    return dict(environ)
  return {**environ, "JAX_PLATFORMS": "cpu"}


def use_cpu_unless_accelerated() -> None:
  """`cpu_only_unless_accelerated` for this process and the ones it starts; call
  before anything touches a device (jax read JAX_PLATFORMS when imported)."""
  os.environ.update(cpu_only_unless_accelerated(os.environ))
  if os.environ.get("JAX_PLATFORMS"):
    jax.config.update("jax_platforms", os.environ["JAX_PLATFORMS"])


def _env_int(environ, name: str, default: int = 1) -> int:
  try:
    return int(environ.get(name, default))
  except ValueError:
    return default


def detect(environ=None) -> str | None:
  """Which multi-process environment this is (None: a single process)."""
  environ = os.environ if environ is None else environ
  if environ.get("JAX_COORDINATOR_ADDRESS"):
    return "coordinator"
  # SLURM_STEP_* exist inside `srun`, not in the batch script around it.
  if "SLURM_STEP_ID" in environ and _env_int(environ, "SLURM_STEP_NUM_TASKS") > 1:
    return "slurm"
  if _env_int(environ, "OMPI_COMM_WORLD_SIZE") > 1:
    return "openmpi"
  if environ is os.environ and on_cloud_tpu_vm():
    return "tpu"
  return None


def _coordinator_args(settings, environment: str) -> dict:
  """Explicit arguments for a coordinator from the config or JAX_* variables;
  {} lets jax detect the cluster (TPU, SLURM, Open MPI)."""
  if environment == "config":
    source, names = settings, ("coordinator_address", "num_processes",
                               "process_id")
    prefix = "distributed."
  elif environment == "coordinator":
    source, names = os.environ, ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES",
                                 "JAX_PROCESS_ID")
    prefix = ""
  else:
    return {}
  missing = [prefix + n for n in names if source.get(n) is None]
  if missing:
    raise ConfigError(f"{prefix + names[0]} is set: also set "
                      f"{' and '.join(missing)}")
  return dict(coordinator_address=str(source.get(names[0])),
              num_processes=int(source.get(names[1])),
              process_id=int(source.get(names[2])))


def initialize(config: ml_collections.ConfigDict) -> None:
  """Joins the job's other processes (once per process; later calls no-op)."""
  settings = config.get("distributed") or ml_collections.ConfigDict()
  mode = settings.get("initialize", "auto")
  if mode not in MODES:
    raise ConfigError(f"distributed.initialize={mode!r}: use one of {MODES}")
  if mode == "no" or jax.distributed.is_initialized():
    return
  environment = "config" if settings.get("coordinator_address") else detect()
  if mode == "auto" and environment is None:
    return
  jax.distributed.initialize(**_coordinator_args(settings, environment))
  quiet_other_processes()
  log.info("process %d of %d (%s): %d of %d devices are local",
           jax.process_index(), jax.process_count(), environment or "detected",
           jax.local_device_count(), jax.device_count())


def quiet_other_processes() -> None:
  """Only process 0 logs progress; the others log warnings and errors."""
  if jax.process_index() != 0:
    logging.getLogger("unclip_jax").setLevel(logging.WARNING)


def to_host(tree):
  """numpy copies of a pytree of arrays, in every process: an array split over
  other processes' devices is all-gathered first, so every process must call
  this together (as evaluation does). One process: `jax.device_get`."""
  def fetch(x):
    if (isinstance(x, jax.Array) and not x.is_fully_addressable
        and not x.is_fully_replicated):
      return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(jax.device_get(x))
  return jax.tree.map(fetch, tree)
