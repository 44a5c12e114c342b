"""Kakao Brain's Karlo (diffusers' UnCLIPPipeline layout) -> four workdirs.

The source is the directory diffusers' `save_pretrained` writes (the published
kakaobrain/karlo-v1-alpha): model_index.json, text_encoder/ + tokenizer/ (a
transformers CLIPTextModelWithProjection and its BPE files), prior/,
text_proj/, decoder/, super_res_first/, super_res_last/ (each config.json and
diffusion_pytorch_model.safetensors, or .bin where torch is installed) and
prior_scheduler/, decoder_scheduler/, super_res_scheduler/. The output is
OUT/clip (text-only), OUT/prior, OUT/decoder and OUT/upsampler, each an
ordinary workdir of `model.arch = "karlo"` (generators/karlo.py), with
sampling defaults as diffusers' UnCLIPPipeline has them.
"""
import json
import logging
import os

import ml_collections

from unclip_jax.convert import clip as clip_convert
from unclip_jax.convert import karlo_prior, karlo_unet
from unclip_jax.convert.tensors import TensorSource, read_state_dict
from unclip_jax.convert.workdir import check_new, write_stage, written_whole
from unclip_jax.errors import ConversionError
from unclip_jax.generators.clip import FrozenClip

log = logging.getLogger(__name__)

WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "model.safetensors",
                "diffusion_pytorch_model.bin", "pytorch_model.bin")
# UnCLIPPipeline.__call__'s defaults.
PRIOR_STEPS, DECODER_STEPS, SUPER_RES_STEPS = 25, 25, 7
PRIOR_GUIDANCE, DECODER_GUIDANCE = 4.0, 8.0


def read_json(path: str) -> dict:
  if not os.path.isfile(path):
    raise ConversionError(f"no {os.path.basename(path)} in {os.path.dirname(path)}: "
                          "is --src a Karlo checkpoint in diffusers' layout?")
  with open(path) as f:
    return json.load(f)


def component(src: str, name: str) -> tuple[dict, TensorSource]:
  """(config.json, tensors) of the component folder `name` of `src`."""
  folder = os.path.join(src, name)
  config = read_json(os.path.join(folder, "config.json"))
  for filename in WEIGHT_FILES:
    path = os.path.join(folder, filename)
    if os.path.isfile(path):
      return config, TensorSource(read_state_dict(path), f"{name}/{filename}")
  raise ConversionError(f"{folder} has none of {', '.join(WEIGHT_FILES)}")


def scheduler_conventions(src: str, name: str, *, prediction: str, variance: str
                          ) -> dict:
  """Our `diffusion` and `sample` fields for a UnCLIPScheduler config, checked
  to be the conventions the generators implement."""
  config = read_json(os.path.join(src, name, "scheduler_config.json"))
  expected = {"beta_schedule": "squaredcos_cap_v2", "prediction_type": prediction,
              "variance_type": variance}
  for field, value in expected.items():
    if config.get(field, value) != value:
      raise ConversionError(f"{name}: {field}={config[field]!r} is not Karlo's "
                            f"{value!r}, which this converter implements")
  clip = config.get("clip_sample", True)
  return {"num_timesteps": int(config.get("num_train_timesteps", 1000)),
          "clip_range": float(config.get("clip_sample_range", 1.0)) if clip else 0.0}


def image_scheduler(src: str, name: str, *, variance: str) -> dict:
  """`scheduler_conventions` of a decoder or super-resolution scheduler (eps
  prediction; images clip to [-1, 1] or not at all)."""
  scheduler = scheduler_conventions(src, name, prediction="epsilon",
                                    variance=variance)
  if scheduler["clip_range"] not in (0.0, 1.0):
    raise ConversionError(f"{name}: clip_sample_range={scheduler['clip_range']}; "
                          "images clip to 1")
  return {"num_timesteps": scheduler["num_timesteps"],
          "clip_denoised": scheduler["clip_range"] == 1.0}


def stage_config(stage: str, model: dict, *, num_timesteps: int,
                 parameterization: str, sample: dict, resolution: int = 0
                 ) -> ml_collections.ConfigDict:
  """A converted stage's config.json."""
  return ml_collections.ConfigDict({
      "stage": stage, "dtype": "float32",
      "model": {"arch": "karlo", **model},
      "data": {"resolution": resolution},
      "diffusion": {"schedule": "cosine", "num_timesteps": num_timesteps,
                    "parameterization": parameterization, "snr_shift": 1.0},
      "sample": {"eta": 0.0, "threshold_percentile": None, **sample}})


def convert_prior(src: str, out: str, frozen_clip: dict) -> str:
  config_json, source = component(src, "prior")
  kwargs = karlo_prior.karlo_prior_kwargs_from_diffusers_config(config_json)
  params = karlo_prior.convert_karlo_prior(source, kwargs)  # every tensor or fails
  scheduler = scheduler_conventions(src, "prior_scheduler", prediction="sample",
                                    variance="fixed_small_log")
  config = stage_config(
      "prior", {"prior": kwargs}, num_timesteps=scheduler["num_timesteps"],
      parameterization="x0", sample={
          "sampler": "ddpm", "variance": "small", "num_steps": PRIOR_STEPS,
          "guidance_scale": PRIOR_GUIDANCE, "num_candidates": 1,
          "clip_range": scheduler["clip_range"]})
  return write_stage(out, config, params, frozen_clip=frozen_clip)


def convert_decoder(src: str, out: str, frozen_clip: dict) -> str:
  unet_json, unet_source = component(src, "decoder")
  proj_json, proj_source = component(src, "text_proj")
  unet_kwargs = karlo_unet.karlo_unet_kwargs_from_diffusers_config(unet_json)
  proj_kwargs = karlo_unet.karlo_text_proj_kwargs_from_diffusers_config(proj_json)
  # Each converter takes every tensor of its source or fails.
  params = {"unet": karlo_unet.convert_karlo_unet(unet_source, unet_kwargs),
            "text_proj": karlo_unet.convert_karlo_text_proj(proj_source, proj_kwargs)}
  scheduler = image_scheduler(src, "decoder_scheduler", variance="learned_range")
  config = stage_config(
      "decoder", {"unet": unet_kwargs, "text_proj": proj_kwargs,
                  "context_length": frozen_clip["context_length"],
                  "learned_variance": True},
      num_timesteps=scheduler["num_timesteps"], parameterization="eps",
      resolution=int(unet_json["sample_size"]), sample={
          "sampler": "ddpm", "variance": "learned", "num_steps": DECODER_STEPS,
          "guidance_scale": DECODER_GUIDANCE,
          "clip_denoised": scheduler["clip_denoised"]})
  return write_stage(out, config, params, frozen_clip=frozen_clip)


def convert_super_res(src: str, out: str, low_res: int) -> str:
  first_json, first_source = component(src, "super_res_first")
  last_json, last_source = component(src, "super_res_last")
  kwargs = karlo_unet.karlo_unet_kwargs_from_diffusers_config(first_json)
  if karlo_unet.karlo_unet_kwargs_from_diffusers_config(last_json) != kwargs:
    raise ConversionError("super_res_first and super_res_last have different "
                          "architectures; Karlo's share one")
  params = {"first": karlo_unet.convert_karlo_unet(first_source, kwargs),
            "last": karlo_unet.convert_karlo_unet(last_source, kwargs)}
  scheduler = image_scheduler(src, "super_res_scheduler", variance="fixed_small_log")
  config = stage_config(
      "upsampler", {"unet": kwargs, "low_res": low_res},
      num_timesteps=scheduler["num_timesteps"], parameterization="eps",
      resolution=int(first_json["sample_size"]), sample={
          "sampler": "ddpm", "variance": "small", "num_steps": SUPER_RES_STEPS,
          "clip_denoised": scheduler["clip_denoised"]})
  return write_stage(out, config, params)


def convert(src: str, out: str) -> dict[str, str]:
  """Converts the Karlo checkpoint at `src` into OUT/{clip,prior,decoder,upsampler};
  returns those paths. Every tensor of every component is used or it fails, and
  then nothing is left at `out`."""
  src = os.path.abspath(src)
  read_json(os.path.join(src, "model_index.json"))
  final = check_new(out)
  with written_whole(final) as work:
    clip_dir = clip_convert.convert_transformers_dir(
        os.path.join(src, "text_encoder"), os.path.join(work, "clip"),
        tokenizer_dir=os.path.join(src, "tokenizer"))
    # Recorded as it will be found once moved into place.
    frozen_clip = {k: v.replace(work, final) if isinstance(v, str) else v
                   for k, v in FrozenClip(clip_dir).record().items()}
    convert_prior(src, os.path.join(work, "prior"), frozen_clip)
    convert_decoder(src, os.path.join(work, "decoder"), frozen_clip)
    low_res = read_json(os.path.join(src, "decoder", "config.json"))["sample_size"]
    convert_super_res(src, os.path.join(work, "upsampler"), int(low_res))
  paths = {name: os.path.join(final, name)
           for name in ("clip", "prior", "decoder", "upsampler")}
  log.info("converted %s into %s", src, ", ".join(paths.values()))
  return paths
