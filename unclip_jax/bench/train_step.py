"""Timing a stage's real train step (the loop's, through `train.setup`)."""
import itertools
import os
import tempfile
import time

import jax
import ml_collections

from unclip_jax import stages, xla_options
from unclip_jax.bench import timing
from unclip_jax.generators.base import ClipSizes
from unclip_jax.parallel import mesh as mesh_lib
from unclip_jax.train import config_checks
from unclip_jax.train import setup as setup_lib

DATA = ("synthetic", "real")


def build_stage(config: ml_collections.ConfigDict,
                clip_config: ml_collections.ConfigDict | None, *, data: str,
                workdir: str | None):
  """The stage, built from configs alone ("synthetic") or prepared from its data
  ("real": the bundled data, and for a prior or decoder a trained
  `config.clip_workdir`)."""
  workdir = workdir or tempfile.mkdtemp()
  # A scratch workdir need not exist yet: the stage writes its tokenizer and
  # caches there.
  os.makedirs(workdir, exist_ok=True)
  stage = stages.get_stage(config.stage)(config, workdir)
  if data == "real":
    stage.validate()
    stage.prepare()
  else:
    stage.build(ClipSizes.from_config(clip_config) if stage.reads_clip else None)
  return stage


def bench_train_step(config: ml_collections.ConfigDict,
                     clip_config: ml_collections.ConfigDict | None = None, *,
                     data: str = "synthetic", workdir: str | None = None,
                     steps: int = 10, repeats: int = 5) -> dict:
  """Seconds per step (median, min, max over `repeats` runs of `steps` steps),
  compile seconds, FLOPs and MFU of `config.stage`'s train step.

  "synthetic": one in-memory batch made up from the stage's abstract batch;
  "real": a new batch from the stage's data pipeline every step, fetched while
  the previous step runs, as the loop does.
  """
  config_checks.check_common(config, reads_data=data == "real")
  stage = build_stage(config, clip_config, data=data, workdir=workdir)
  mesh = mesh_lib.make_mesh(config.mesh.shape, config.mesh.dcn_shape)
  began = time.perf_counter()
  run = setup_lib.setup(config, stage, mesh)
  compile_seconds = time.perf_counter() - began
  train_state = run.init_state(jax.random.key(0))
  rng = jax.random.key(1)
  if data == "real":
    iterator = stage.train_iterator()
    first = next(iterator)
    setup_lib.check_batch(first, run.abstract_batch, jax.process_count())
    batches = itertools.chain([first], iterator)
    next_batch = lambda: run.global_batch(next(batches))
  else:
    vocab = (clip_config or config).get("tokenizer", {}).get("vocab_size", 256)
    fixed = run.global_batch(timing.synthetic_batch(stage.abstract_batch(),
                                                    vocab_size=vocab))
    next_batch = lambda: fixed
  batch = next_batch()

  def run_steps():
    nonlocal train_state, batch
    for _ in range(steps):
      train_state, metrics = run.step(train_state, batch, rng)
      batch = next_batch()
    return metrics

  seconds = timing.time_calls(run_steps, repeats=repeats)
  step_time = {k: v / steps for k, v in seconds.items()}
  flops = run.flops_per_step / mesh.size
  return {"benchmark": "train_step", "stage": config.stage, "dtype": config.dtype,
          "data": data, "batch_size": config.batch_size,
          "devices": jax.device_count(), "device": jax.devices()[0].device_kind,
          "compiler_options": xla_options.compiler_options(),
          "compile_seconds": compile_seconds,
          **{f"step_time_{k}": v for k, v in step_time.items()},
          "examples_per_sec": config.batch_size / step_time["median"],
          "gflops_per_step_per_device": flops / 1e9,
          "gflops_per_sec": flops / step_time["median"] / 1e9,
          **timing.mfu_against(flops / step_time["median"], config.dtype),
          **timing.ceilings()}
