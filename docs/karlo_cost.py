"""Time and memory of Karlo's three generative stages at full size, one image.

  python docs/karlo_cost.py [--stages prior,decoder,upsampler]

Each stage runs in its own process (so its peak memory is its own) with the
published architecture (Karlo's configs, as convert/karlo.py reads them) and
random weights: the compute does not depend on the values. A stage samples
one image with diffusers' UnCLIPPipeline defaults (prior 25 steps at guidance 4,
decoder 25 at guidance 8, super-resolution 64 -> 256 in 7), twice: the first
call compiles, the second is the steady state. Prints one markdown row per stage.
"""
import argparse
import json
import resource
import subprocess
import sys
import time

SUPER_RES = dict(_class_name="UNet2DModel", sample_size=256, layers_per_block=3,
                 down_block_types=["ResnetDownsampleBlock2D"] * 4,
                 up_block_types=["ResnetUpsampleBlock2D"] * 4,
                 block_out_channels=[320, 640, 960, 1280], in_channels=6,
                 out_channels=3, add_attention=False)
DECODER = dict(_class_name="UNet2DConditionModel", sample_size=64, layers_per_block=3,
               in_channels=3, out_channels=6,
               down_block_types=["ResnetDownsampleBlock2D"]
               + ["SimpleCrossAttnDownBlock2D"] * 3,
               up_block_types=["SimpleCrossAttnUpBlock2D"] * 3
               + ["ResnetUpsampleBlock2D"],
               mid_block_type="UNetMidBlock2DSimpleCrossAttn",
               block_out_channels=[320, 640, 960, 1280], cross_attention_dim=1536,
               class_embed_type="identity", attention_head_dim=64,
               resnet_time_scale_shift="scale_shift")
TEXT_PROJ = dict(time_embed_dim=1280, cross_attention_dim=1536)
CONTEXT, WIDTH = 77, 768  # ViT-L/14's text tower


def generator_and_inputs(stage: str):
  """(generator, conditioning, sample options) of a full-size Karlo stage."""
  import numpy as np  # pylint: disable=import-outside-toplevel
  from unclip_jax.convert import karlo, karlo_prior, karlo_unet  # pylint: disable=import-outside-toplevel
  from unclip_jax.generators import karlo as generators  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(0)
  caption = {name: rng.standard_normal(shape).astype(np.float32) for name, shape in (
      ("text_embedding", (1, WIDTH)), ("text_encodings", (1, CONTEXT, WIDTH)),
      ("null_text_embedding", (1, WIDTH)), ("null_text_encodings", (1, CONTEXT, WIDTH)))}
  mask = np.arange(CONTEXT)[None] < 8
  caption.update(text_mask=mask, null_text_mask=mask)
  common = dict(num_timesteps=1000)
  if stage == "prior":
    config = karlo.stage_config(
        "prior", {"prior": karlo_prior.KARLO_PRIOR}, parameterization="x0",
        sample=dict(sampler="ddpm", variance="small", num_steps=25,
                    guidance_scale=4.0, num_candidates=1, clip_range=5.0), **common)
    return generators.KarloPriorGenerator(config), caption
  if stage == "decoder":
    config = karlo.stage_config(
        "decoder", {"unet": karlo_unet.karlo_unet_kwargs_from_diffusers_config(DECODER),
                    "text_proj": karlo_unet.karlo_text_proj_kwargs_from_diffusers_config(
                        TEXT_PROJ), "context_length": CONTEXT, "learned_variance": True},
        parameterization="eps", resolution=64, sample=dict(
            sampler="ddpm", variance="learned", num_steps=25, guidance_scale=8.0,
            clip_denoised=True), **common)
    return generators.KarloDecoderGenerator(config), {
        "image_embedding": rng.standard_normal((1, WIDTH)).astype(np.float32),
        **caption}
  config = karlo.stage_config(
      "upsampler", {"unet": karlo_unet.karlo_unet_kwargs_from_diffusers_config(SUPER_RES),
                    "low_res": 64}, parameterization="eps", resolution=256,
      sample=dict(sampler="ddpm", variance="small", num_steps=7, clip_denoised=True),
      **common)
  return generators.KarloSuperResGenerator(config), {
      "low_res": rng.uniform(-1, 1, (1, 64, 64, 3)).astype(np.float32)}


def measure(stage: str) -> dict:
  import jax  # pylint: disable=import-outside-toplevel
  generator, conditioning = generator_and_inputs(stage)
  started = time.perf_counter()
  params = jax.jit(generator.init_params)(jax.random.key(0))
  jax.block_until_ready(params)
  init_seconds = time.perf_counter() - started
  count = sum(x.size for x in jax.tree.leaves(params))
  seconds = []
  for _ in range(2):
    started = time.perf_counter()
    jax.block_until_ready(generator.sample(params, conditioning, jax.random.key(1)))
    seconds.append(time.perf_counter() - started)
  peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB
  return {"stage": stage, "params": count, "init_s": init_seconds,
          "first_s": seconds[0], "steady_s": seconds[1], "peak_rss_gib": peak,
          "device": jax.devices()[0].device_kind}


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--stages", default="prior,decoder,upsampler")
  parser.add_argument("--one", help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.one:
    print(json.dumps(measure(args.one)))
    return
  print("| stage | params | one image, steady (s) | first call, compiling (s) | "
        "peak memory (GiB) | device |\n|---|---|---|---|---|---|")
  for stage in args.stages.split(","):
    done = subprocess.run([sys.executable, __file__, "--one", stage],
                          capture_output=True, text=True, check=True)
    r = json.loads(done.stdout.strip().splitlines()[-1])
    print(f"| {r['stage']} | {r['params'] / 1e6:.0f}M | {r['steady_s']:.1f} | "
          f"{r['first_s']:.1f} | {r['peak_rss_gib']:.1f} | {r['device']} |",
          flush=True)


if __name__ == "__main__":
  main()
