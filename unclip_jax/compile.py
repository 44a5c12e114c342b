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
import os
import sys
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import flags
from ml_collections import config_flags

from unclip_jax import cli, stages
from unclip_jax.errors import ConfigError, UserError
from unclip_jax.parallel import coverage, partitioning, topologies
from unclip_jax.parallel.mesh import make_mesh
from unclip_jax.train import config_checks, optim, state
from unclip_jax.train import step as step_lib

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


def _struct(shape, dtype) -> jax.ShapeDtypeStruct:
  return jax.ShapeDtypeStruct(tuple(shape), jnp.dtype(dtype))


def stage_for_compile(config: ml_collections.ConfigDict,
                      clip_config: ml_collections.ConfigDict | None = None):
  """(stage with its model built from configs alone, global batch of
  ShapeDtypeStructs as the data pipeline delivers it). No data is read."""
  name, batch = config.stage, config.batch_size
  side = config.data.get("resolution")
  stage = stages.get_stage(name)(config, workdir="unused")
  if name in ("prior", "decoder") and clip_config is None:
    raise ConfigError(f"the {name} needs its CLIP's sizes: pass --clip_config "
                      "configs/clip.py:<preset>")
  if name == "clip":
    from unclip_jax.stages.clip import build_clip
    stage.validate()
    stage.model = build_clip(config)
    return stage, {"image": _struct((batch, side, side, 3), np.float32),
                   "tokens": _struct((batch, config.tokenizer.context_length),
                                     np.int32)}
  if name == "upsampler":
    from unclip_jax.stages import upsampler
    upsampler.validate_config(config)
    stage.upsampler = upsampler.Upsampler(config)
    return stage, {"image": _struct((batch, side, side, 3), np.float32)}
  clip = clip_config.model
  context = clip_config.tokenizer.context_length
  if name == "prior":
    from unclip_jax.stages.prior_model import DiffusionPrior
    dim = clip.embed_dim
    # "standardize" scales by the cache's statistics; any positive ones do here.
    stats = (np.zeros(dim, np.float32), np.ones(dim, np.float32))
    stage.prior = DiffusionPrior.from_config(
        config, embed_dim=dim, text_width=clip.text_width,
        context_length=context, stats=stats)
    return stage, {
        "image_embedding": _struct((batch, dim), np.float32),
        "text_embedding": _struct((batch, dim), np.float32),
        "text_encodings": _struct((batch, context, clip.text_width),
                                  np.float16),
        "text_mask": _struct((batch, context), np.bool_)}
  from unclip_jax.stages import decoder
  decoder.validate_config(config)
  stage.decoder = decoder.Decoder(
      config, image_embedding_dim=clip.embed_dim,
      vocab_size=clip_config.tokenizer.vocab_size, context_length=context)
  return stage, {"image": _struct((batch, side, side, 3), np.float32),
                 "image_embedding": _struct((batch, clip.embed_dim),
                                            np.float32),
                 "tokens": _struct((batch, context), np.int32)}


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
                             num_processes=1)
  stage, local_batch = stage_for_compile(config, clip_config)
  try:
    mesh = make_mesh(config.mesh.shape, config.mesh.dcn_shape, devices=devices)
  except ValueError as e:
    raise ConfigError(str(e)) from None
  rules = partitioning.rules_from_config(config.mesh.rules)
  tx = optim.make_optimizer(config.optim, config.total_steps)
  rng = jax.random.key(0)
  params = jax.eval_shape(stage.init_params, rng)
  coverage.check_coverage(params, mesh, rules, config.mesh.get(
      "max_replicated_fraction", coverage.MAX_REPLICATED_FRACTION))
  abstract_state, shardings = state.abstract_state(stage.init_params, tx, mesh,
                                                   rules, rng)
  batch, batch_shardings = partitioning.abstract_global_batch(
      local_batch, mesh, rules, num_processes=1)
  abstract_rng = jax.ShapeDtypeStruct(rng.shape, rng.dtype,
                                      sharding=partitioning.replicated(mesh))
  began = time.perf_counter()
  report = {"stage": config.stage, "topology": topology.name,
            "chips": len(devices), "chip": topology.kind,
            "hbm_bytes": hbm_bytes,
            "mesh": {k: int(v) for k, v in mesh.shape.items()},
            "batch_size": config.batch_size, "dtype": config.dtype,
            "grad_accum_steps": config.optim.get("grad_accum_steps", 1),
            **coverage.summary(params, mesh, rules)}
  try:
    compiled, flops = step_lib.compile_train_step(
        stage.loss, tx, config, mesh, rules, shardings, batch_shardings,
        abstract_state, batch, abstract_rng)
  except jax.errors.JaxRuntimeError as e:
    if "RESOURCE_EXHAUSTED" not in str(e):
      raise
    # XLA:TPU refuses programs that cannot fit: that is the answer too.
    report.update(fits=False, error=" ".join(str(e).split())[:300])
    return report
  per_chip = flops / len(devices)
  report.update(
      compile_seconds=round(time.perf_counter() - began, 1),
      memory=_memory(compiled), flops_total=flops, flops_per_chip=per_chip,
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


def _default_clip_config():
  """configs/clip.py with the preset of --config (e.g. ...prior.py:paper)."""
  from configs import clip as clip_configs
  filename = config_flags.get_config_filename(flags.FLAGS["config"])
  preset = filename.split(":", 1)[1] if ":" in filename else "paper"
  try:
    return clip_configs.get_config(preset)
  except ValueError:
    raise UserError(f"configs/clip.py has no preset {preset!r}; pass "
                    "--clip_config configs/clip.py:<preset>") from None


def main(argv):
  del argv
  if not os.environ.get("JAX_PLATFORMS"):
    # The host's own work (shapes, keys) runs on CPU; libtpu only describes
    # the slice.
    jax.config.update("jax_platforms", "cpu")
  config = _CONFIG.value
  if _MESH.value:
    try:
      config.mesh.shape = tuple(int(s) for s in _MESH.value.split(","))
    except ValueError:
      raise UserError(f"--mesh={_MESH.value!r}: use data,fsdp,tensor, e.g. "
                      "16,8,1") from None
  topology = topologies.parse(_TOPOLOGY.value, _NUM_SLICES.value)
  clip_config = _CLIP_CONFIG.value
  if clip_config is None and config.stage in ("prior", "decoder"):
    clip_config = _default_clip_config()
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
