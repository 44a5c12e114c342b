"""Timing the generators' compiled samplers, and the whole chain."""
import time
from typing import Sequence

import flax.linen as nn
import jax
import ml_collections

from unclip_jax import generators, xla_options
from unclip_jax.bench import timing
from unclip_jax.generators.base import IMAGE, IMAGE_EMBEDDING, LOW_RES, ClipSizes
from unclip_jax.train import flops as flops_lib

# What each generator samples (dropped from its batch to leave its conditioning).
_TARGETS = {"prior": IMAGE_EMBEDDING, "decoder": IMAGE, "upsampler": IMAGE}


def conditioning_for(generator, batch_size: int, vocab_size: int) -> dict:
  """Synthetic conditioning for `batch_size` samples of `generator`."""
  stage = generator.config.stage
  abstract = dict(generator.abstract_batch(batch_size))
  target = abstract.pop(_TARGETS[stage])
  if stage == "upsampler":  # the conditioning is the low-res image
    side = generator.config.model.low_res
    abstract = {LOW_RES: jax.ShapeDtypeStruct((batch_size, side, side, 3),
                                              target.dtype)}
  return timing.synthetic_batch(abstract, vocab_size=vocab_size)


def bench_sampling(config: ml_collections.ConfigDict,
                   clip_config: ml_collections.ConfigDict | None = None, *,
                   batch_size: int = 16, num_steps: int | None = None,
                   repeats: int = 3, workdir: str | None = None,
                   **options) -> dict:
  """Seconds per sampled item of `config.stage`'s compiled sampler (all steps in
  one call; compilation excluded and reported apart), on random params or on
  the trained ones in `workdir`."""
  if workdir:
    trained = generators.load(workdir, config.stage)
    generator, params, config = trained.generator, trained.params, trained.config
  else:
    sizes = (ClipSizes.from_config(clip_config)
             if config.stage in generators.READS_CLIP else None)
    generator = generators.generator_class(config.stage, config).from_config(config, sizes)
    params = jax.jit(lambda r: nn.unbox(generator.init_params(r)))(
        jax.random.key(0))
  vocab = clip_config.tokenizer.vocab_size if clip_config else 256
  conditioning = conditioning_for(generator, batch_size, vocab)
  num_steps = num_steps or config.sample.num_steps

  def sample():
    return generator.sample(params, conditioning, jax.random.key(1),
                            num_steps=num_steps, **options)

  began = time.perf_counter()
  jax.block_until_ready(sample())
  first_call = time.perf_counter() - began
  seconds = timing.time_calls(sample, repeats=repeats, warmup=0)
  flops = flops_lib.count_flops(lambda p, c: generator.sample(
      p, c, jax.random.key(1), num_steps=num_steps, **options), params, conditioning)
  per_second = flops / seconds["median"]
  return {"benchmark": "sampling", "stage": config.stage, "dtype": config.dtype,
          "batch_size": batch_size, "sampling_steps": num_steps,
          "devices": jax.device_count(), "device": jax.devices()[0].device_kind,
          "compiler_options": xla_options.compiler_options(),
          "compile_seconds": max(first_call - seconds["median"], 0.0),
          **{f"seconds_per_call_{k}": v for k, v in seconds.items()},
          "seconds_per_item": seconds["median"] / batch_size,
          "gflops_per_call": flops / 1e9, "gflops_per_sec": per_second / 1e9,
          **timing.mfu_against(per_second, config.dtype), **timing.ceilings()}


def bench_chain(*, clip: str, prior: str, decoder: str,
                upsamplers: Sequence[str] = (), num_prompts: int = 4,
                num_images: int = 1, repeats: int = 3) -> dict:
  """Prompts per second through trained workdirs (UnCLIPPipeline), every stage
  at its config's sampling defaults."""
  from unclip_jax.pipeline import UnCLIPPipeline  # pylint: disable=import-outside-toplevel
  pipe = UnCLIPPipeline.from_workdirs(clip=clip, prior=prior, decoder=decoder,
                                      upsamplers=list(upsamplers))
  prompts = [f"prompt {i}" for i in range(num_prompts)]
  began = time.perf_counter()
  pipe(prompts, num_images=num_images, seed=0)
  first_call = time.perf_counter() - began
  seconds = timing.time_calls(lambda: pipe(prompts, num_images=num_images, seed=0),
                              repeats=repeats, warmup=0)
  return {"benchmark": "chain", "prompts": num_prompts, "num_images": num_images,
          "resolution": pipe.resolution, "devices": jax.device_count(),
          "first_call_seconds": first_call,
          **{f"seconds_per_call_{k}": v for k, v in seconds.items()},
          "prompts_per_sec": num_prompts / seconds["median"]}
