"""Benchmarks (speed goals are checked here, never in timed tests).

  python -m unclip_jax.bench train_step --config configs/clip.py:demo [--steps 20]
      compiles a stage's real train step on one real batch and reports step
      time, examples/s and MFU.
  python -m unclip_jax.bench prior_sampling --config configs/prior.py:demo \
      [--clip_config configs/clip.py:demo] [--batch 64] [--sampling_steps 64]
      times the prior's compiled sampler (all steps and candidates in one
      call) and reports seconds per caption.

Compare ratios measured in one run: this machine is shared and noisy.
"""
import json
import math
import time
from typing import Any

import flax.linen as nn
import jax
import ml_collections
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from unclip_jax import cli, stages
from unclip_jax.generators.base import IMAGE_EMBEDDING, TEXT_MASK, ClipSizes
from unclip_jax.generators.prior import Prior
from unclip_jax.parallel import mesh as mesh_lib
from unclip_jax.train import config_checks, progress
from unclip_jax.train import setup as setup_lib

_CONFIG = config_flags.DEFINE_config_file("config", None, "stage config")
_CLIP_CONFIG = config_flags.DEFINE_config_file(
    "clip_config", None, "the CLIP config a prior pairs with (prior_sampling)")
_STEPS = flags.DEFINE_integer("steps", 20, "timed steps after warm-up")
_BATCH = flags.DEFINE_integer("batch", 64, "captions per sampling call")
_SAMPLING_STEPS = flags.DEFINE_integer("sampling_steps", 64, "DDIM steps")
_WORKDIR = flags.DEFINE_string("workdir", "/tmp/unclip_bench",
                               "scratch workdir (tokenizer, caches)")


def bench_train_step(config, workdir: str, steps: int) -> dict[str, float]:
  """Times `steps` train steps of `config.stage` on one real input batch."""
  config_checks.check_common(config)
  stage = stages.get_stage(config.stage)(config, workdir)
  stage.validate()
  stage.prepare()
  mesh = mesh_lib.make_mesh(config.mesh.shape, config.mesh.dcn_shape)
  began = time.perf_counter()
  run = setup_lib.setup(config, stage, mesh)
  compile_seconds = time.perf_counter() - began
  train_state = run.init_state(jax.random.key(0))
  batch = run.global_batch(next(stage.train_iterator()))
  train_state, metrics = run.step(train_state, batch, jax.random.key(1))
  jax.block_until_ready(metrics)
  began = time.perf_counter()
  for _ in range(steps):
    train_state, metrics = run.step(train_state, batch, jax.random.key(1))
  jax.block_until_ready(metrics)
  step_time = (time.perf_counter() - began) / steps
  flops = run.flops_per_step / mesh.size
  peak = progress.peak_flops_per_device(config.get("peak_flops"))
  return {"stage": config.stage, "compile_seconds": compile_seconds,
          "step_time": step_time,
          "examples_per_sec": config.batch_size / step_time,
          "gflops_per_step_per_device": flops / 1e9,
          "mfu": flops / step_time / peak if peak else float("nan"),
          "devices": jax.device_count(), "dtype": config.dtype}


def time_prior_sampling(config: ml_collections.ConfigDict,
                        clip_config: ml_collections.ConfigDict, *,
                        batch_size: int = 64, num_steps: int = 64,
                        num_candidates: int = 2, guidance_scale: float = 1.0,
                        repeats: int = 3, params: Any = None) -> float:
  """Seconds per caption for sampling `batch_size` captions as one compiled call
  (compilation excluded; the best of `repeats`), on random params unless given."""
  prior = Prior.from_config(config, ClipSizes.from_config(clip_config))
  if params is None:
    params = jax.jit(lambda r: nn.unbox(prior.init_params(r)))(jax.random.key(0))
  conditioning = {
      k: np.random.default_rng(0).normal(size=s.shape).astype(s.dtype)
      for k, s in prior.abstract_batch(batch_size).items() if k != IMAGE_EMBEDDING}
  context = prior.clip_context
  conditioning[TEXT_MASK] = np.broadcast_to(
      np.arange(context)[None] < context // 2, (batch_size, context))

  def run():
    return jax.block_until_ready(prior.sample(
        params, conditioning, jax.random.key(1), num_steps=num_steps,
        guidance_scale=guidance_scale, num_candidates=num_candidates))

  run()  # compile
  best = math.inf
  for _ in range(repeats):
    began = time.perf_counter()
    run()
    best = min(best, time.perf_counter() - began)
  return best / batch_size


def bench_prior_sampling(config, clip_config, batch: int, num_steps: int):
  seconds = time_prior_sampling(config, clip_config, batch_size=batch,
                                num_steps=num_steps)
  return {"stage": "prior", "batch": batch, "sampling_steps": num_steps,
          "seconds_per_caption": seconds,
          "seconds_per_call": seconds * batch, "devices": jax.device_count()}


def main(argv):
  command = argv[1] if len(argv) > 1 else "train_step"
  if command == "train_step":
    result = bench_train_step(_CONFIG.value, _WORKDIR.value, _STEPS.value)
  elif command == "prior_sampling":
    if _CLIP_CONFIG.value is None:
      raise app.UsageError("prior_sampling needs --clip_config "
                           "configs/clip.py:<preset>")
    result = bench_prior_sampling(_CONFIG.value, _CLIP_CONFIG.value,
                                  _BATCH.value, _SAMPLING_STEPS.value)
  else:
    raise app.UsageError(f"unknown benchmark {command!r}; use train_step or "
                         "prior_sampling")
  print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v)
                    for k, v in result.items()}))


if __name__ == "__main__":
  flags.mark_flag_as_required("config")
  cli.run(main)
