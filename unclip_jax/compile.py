"""Ahead-of-time compilation of a stage's real train step for a TPU slice, on
a host without TPUs: does the paper preset fit, and how many FLOPs is a step?

  python -m unclip_jax.compile --config configs/decoder.py:paper \\
      --topology v5p-256 [--mesh 16,8,1] [--num_slices 1] \\
      [--clip_config configs/clip.py:paper] [--json FILE] [--config.x.y=v ...]

The step is the trainer's (`train.step.compile_train_step`): the same model,
loss, optimiser, shardings, donation and gradient accumulation, lowered on
abstract values (nothing is allocated) for the slice's compile-only devices
(`jax.experimental.topologies`, libtpu from the `tpu` extra), as MaxText's
train_compile.py. Prints per-chip memory (arguments, outputs, temporaries),
FLOPs per step, and whether it fits the chip's HBM. Exit code 0: fits; 1: does
not fit; 2: bad flags or config.

The prior and the decoder take their CLIP's sizes (embedding width, text
width, context, vocabulary) from `--clip_config`, by default
configs/clip.py with the same preset.
"""
import json
import math
import os
import sys
import time

import jax
import ml_collections
import numpy as np
from absl import flags
from ml_collections import config_flags

from unclip_jax import cli, stages
from unclip_jax.errors import ConfigError, UserError
from unclip_jax.generators.base import ClipSizes
from unclip_jax.parallel import coverage, partitioning, topologies
from unclip_jax.parallel.mesh import make_mesh, resolve_shape
from unclip_jax.train import config_checks
from unclip_jax.train import setup as setup_lib

_CONFIG = config_flags.DEFINE_config_file("config", None,
                                          "configs/<stage>.py:<preset>")
_CLIP_CONFIG = config_flags.DEFINE_config_file(
    "clip_config", None, "the CLIP a prior or decoder reads (default: "
    "configs/clip.py with the --config preset)")
_TOPOLOGY = flags.DEFINE_string("topology", None,
                                "TPU slice: v5p-256, v5e-16, v4-8, v5p:4x4x8")
_NUM_SLICES = flags.DEFINE_integer("num_slices", 1, "slices joined over DCN")
_MESH = flags.DEFINE_string("mesh", None, "in-slice mesh data,fsdp,tensor "
                            "(-1 = the rest); default: the config's")
_HBM_GIB = flags.DEFINE_float("hbm_gib", None, "HBM per chip to fit in "
                               "(default: the chip's; lower it for headroom)")
_JSON = flags.DEFINE_string("json", None, "also append the report to FILE as "
                            "one JSON line")


def stage_for_compile(config: ml_collections.ConfigDict,
                      clip_config: ml_collections.ConfigDict | None = None):
  """The stage with its model built from configs alone (no data is read)."""
  stage = stages.get_stage(config.stage)(config, workdir="unused")
  clip_sizes = None
  if stage.reads_clip:
    if clip_config is None:
      raise ConfigError(f"the {config.stage} needs its CLIP's sizes: pass "
                        "--clip_config configs/clip.py:<preset>")
    clip_sizes = ClipSizes.from_config(clip_config)
  stage.build(clip_sizes)
  return stage


def _memory(compiled) -> dict[str, int]:
  stats = compiled.memory_analysis()
  memory = {name: int(getattr(stats, f"{name}_size_in_bytes", 0) or 0)
            for name in ("argument", "output", "alias", "temp",
                         "generated_code")}
  # Donated state comes back in place: aliased bytes are counted once.
  memory["total"] = (memory["argument"] + memory["output"] - memory["alias"]
                     + memory["temp"] + memory["generated_code"])
  return memory


def compile_for_topology(config: ml_collections.ConfigDict,
                         topology: topologies.Topology,
                         clip_config: ml_collections.ConfigDict | None = None,
                         hbm_bytes: float | None = None) -> dict:
  """Compiles `config`'s train step for `topology`; returns the report.

  `hbm_bytes`: the memory it must fit in per chip (default: the chip's HBM).
  """
  hbm_bytes = hbm_bytes or topology.chip.hbm_bytes
  devices = topologies.compile_only_devices(topology)
  if topology.num_slices > 1 and np.prod(config.mesh.dcn_shape) == 1:
    config.mesh.dcn_shape = (topology.num_slices, 1, 1)  # DCN carries data
  config_checks.check_common(config, num_devices=len(devices),
                             num_processes=1, num_slices=topology.num_slices,
                             reads_data=False)
  stage = stage_for_compile(config, clip_config)
  try:
    mesh = make_mesh(config.mesh.shape, config.mesh.dcn_shape, devices=devices)
  except ValueError as e:
    raise ConfigError(str(e)) from None
  rules = partitioning.rules_from_config(config.mesh.rules)
  params = jax.eval_shape(stage.init_params, jax.random.key(0))
  began = time.perf_counter()
  report = {"stage": config.stage, "topology": topology.name,
            "chips": len(devices), "chip": topology.kind,
            "hbm_bytes": hbm_bytes,
            "mesh": {k: int(v) for k, v in mesh.shape.items()},
            "batch_size": config.batch_size, "dtype": config.dtype,
            "grad_accum_steps": config.optim.get("grad_accum_steps", 1),
            **coverage.summary(params, mesh, rules)}
  try:
    run = setup_lib.setup(config, stage, mesh)
  except jax.errors.JaxRuntimeError as e:
    if "RESOURCE_EXHAUSTED" not in str(e):
      raise
    # XLA:TPU refuses programs that cannot fit: that is the answer too.
    report.update(fits=False, error=" ".join(str(e).split())[:300])
    return report
  per_chip = run.flops_per_step / len(devices)
  report.update(
      compile_seconds=round(time.perf_counter() - began, 1),
      memory=_memory(run.step), flops_total=run.flops_per_step,
      flops_per_chip=per_chip,
      seconds_at_peak=per_chip / topology.chip.peak_flops)
  report["fits"] = report["memory"]["total"] <= hbm_bytes
  return report


def _gib(n: float) -> str:
  return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def format_report(report: dict) -> str:
  mesh = " x ".join(f"{k} {v}" for k, v in report["mesh"].items())
  lines = [
      f"{report['stage']} on {report['topology']} ({report['chips']} chips, "
      f"{_gib(report['hbm_bytes'])} HBM each), mesh {mesh}, batch "
      f"{report['batch_size']} in {report['grad_accum_steps']} "
      f"microbatch(es), {report['dtype']} compute",
      f"params {report['params']:,}: {_gib(report['param_bytes'])} "
      f"f32, {_gib(report['param_bytes_per_device'])} per chip, "
      f"{report['replicated_fraction']:.1%} replicated"]
  if "error" in report:
    lines.append(f"does not fit: {report['error']}")
    return "\n".join(lines)
  m = report["memory"]
  lines += [
      f"per chip: arguments {_gib(m['argument'])}, outputs {_gib(m['output'])}"
      f" ({_gib(m['alias'])} aliased), temporaries {_gib(m['temp'])}, code "
      f"{_gib(m['generated_code'])}; total {_gib(m['total'])} of "
      f"{_gib(report['hbm_bytes'])}: {'fits' if report['fits'] else 'does NOT fit'}",
      f"FLOPs per step (matmuls and convolutions, remat included): "
      f"{report['flops_total']:.3e}, {report['flops_per_chip']:.3e} per chip; "
      f"{report['seconds_at_peak']:.3f} s per step at the chip's peak "
      f"(divide by the MFU you expect)",
      f"compiled in {report['compile_seconds']} s"]
  return "\n".join(lines)


def main(argv):
  del argv
  if not os.environ.get("JAX_PLATFORMS"):
    # The host's own work (shapes, keys) runs on CPU; libtpu only describes
    # the slice.
    jax.config.update("jax_platforms", "cpu")
  config = _CONFIG.value
  if _HBM_GIB.value is not None and _HBM_GIB.value <= 0:
    raise UserError(f"--hbm_gib={_HBM_GIB.value}: must be > 0 (or left out: "
                    "the chip's HBM)")
  topology = topologies.parse(_TOPOLOGY.value, _NUM_SLICES.value)
  if _MESH.value:
    chips = math.prod(topology.grid)  # per slice: the mesh is in-slice
    try:
      config.mesh.shape = tuple(int(s) for s in _MESH.value.split(","))
      resolve_shape(config.mesh.shape, chips)
    except ValueError:
      raise UserError(f"--mesh={_MESH.value}: use data,fsdp,tensor sizes that "
                      f"multiply to the slice's {chips} chips (one may be -1), "
                      f"e.g. {chips},1,1") from None
  clip_config = _CLIP_CONFIG.value
  if clip_config is None and stages.get_stage(config.stage).reads_clip:
    clip_config = cli.default_clip_config("paper")
  hbm = _HBM_GIB.value * 2**30 if _HBM_GIB.value else None
  report = compile_for_topology(config, topology, clip_config, hbm)
  print(format_report(report))
  if _JSON.value:
    with open(_JSON.value, "a") as f:
      f.write(json.dumps(report, sort_keys=True) + "\n")
  sys.exit(0 if report["fits"] else 1)


if __name__ == "__main__":
  flags.mark_flags_as_required(["config", "topology"])
  cli.run(main)
