"""Sample from trained stages and write a PNG grid; prints its path.

  python -m unclip_jax.sample --clip DIR --prior DIR --decoder DIR \
      --upsampler DIR [--upsampler DIR ...] --prompt "..." [--prompt ...] \
      --num_images N --seed S --out FILE.png
  python -m unclip_jax.sample variations --image IMG [--eta 1.0]
      [--latents inverted|random] ...
  python -m unclip_jax.sample interpolate --image A --image B [--frames 5]
      [--latents fixed|inverted] ...
  python -m unclip_jax.sample text_diff --image IMG --from_caption "..."
      --to_caption "..." [--frames 5] [--max_theta 0.5] ...

`generate` (the default) writes a row per prompt; the manipulations write one
strip, the input image(s) included. Every stage's sampler, steps, eta, variance
(and guidance, thresholding where the stage has them) is a flag; the
manipulations decode with DDIM themselves. See docs/sampling.md.
"""
import os

from absl import flags
from absl import logging as absl_logging

from unclip_jax import cli
from unclip_jax.errors import UserError

COMMANDS = ("generate", "variations", "interpolate", "text_diff")
# diffusion.SAMPLERS and DDPM_VARIANCES (tests hold them equal), spelled out so
# that --help and flag errors come back without importing jax.
SAMPLERS = ("ddim", "ddpm", "analytic")
VARIANCES = ("small", "large", "learned")
_LATENTS_DEFAULT = {"variations": "inverted", "interpolate": "fixed"}
_MIN_TILE = 64  # small images are enlarged by pixel repetition to this side

_CLIP = flags.DEFINE_string("clip", None, "the CLIP stage's workdir")
_PRIOR = flags.DEFINE_string("prior", None, "the prior's workdir (for generate)")
_DECODER = flags.DEFINE_string("decoder", None, "the decoder's workdir")
_UPSAMPLER = flags.DEFINE_multi_string(
    "upsampler", [], "an upsampler's workdir; repeat, lowest resolution first")
_OUT = flags.DEFINE_string("out", None, "the PNG to write")
_PROMPT = flags.DEFINE_multi_string("prompt", [], "a prompt; repeat for more rows")
_NUM_IMAGES = flags.DEFINE_integer("num_images", 4,
                                   "images per prompt (variations: in all)")
_SEED = flags.DEFINE_integer("seed", 0, "the same seed gives the same images")
_SAMPLER_HELP = ("ddim (eta), ddpm (variance) or analytic (needs the "
                 "workdir's eps_moments.json); default: the stage config's")
_PRIOR_SAMPLER = flags.DEFINE_enum("prior_sampler", None, SAMPLERS, _SAMPLER_HELP)
_PRIOR_STEPS = flags.DEFINE_integer("prior_steps", None, "default: prior config")
_PRIOR_GUIDANCE = flags.DEFINE_float("prior_guidance", None, "default: config")
_PRIOR_CANDIDATES = flags.DEFINE_integer("prior_candidates", None,
                                         "default: config")
_PRIOR_ETA = flags.DEFINE_float("prior_eta", None, "ddim's eta; default: config")
_PRIOR_VARIANCE = flags.DEFINE_enum("prior_variance", None, VARIANCES[:2],
                                    "ddpm's variance; default: small")
_DECODER_SAMPLER = flags.DEFINE_enum("decoder_sampler", None, SAMPLERS,
                                     _SAMPLER_HELP + " (generate only)")
_DECODER_STEPS = flags.DEFINE_integer("decoder_steps", None, "default: config")
_DECODER_GUIDANCE = flags.DEFINE_float("decoder_guidance", None, "default: config")
_DECODER_ETA = flags.DEFINE_float("decoder_eta", None,
                                  "ddim's eta (generate only); default: config")
_DECODER_VARIANCE = flags.DEFINE_enum(
    "decoder_variance", None, VARIANCES,
    "ddpm's variance (generate only); default: what the decoder was trained for")
_DECODER_THRESHOLD = flags.DEFINE_float(
    "decoder_threshold", None,
    "dynamic thresholding percentile, e.g. 99.5; default: config (off)")
_UPSAMPLER_SAMPLER = flags.DEFINE_multi_enum(
    "upsampler_sampler", None, SAMPLERS,
    _SAMPLER_HELP + "; once for all upsamplers or once each")
_UPSAMPLER_STEPS = flags.DEFINE_multi_integer(
    "upsampler_steps", None, "one value for all upsamplers or one each")
_UPSAMPLER_ETA = flags.DEFINE_multi_float(
    "upsampler_eta", None, "ddim's eta; once for all upsamplers or once each")
_UPSAMPLER_VARIANCE = flags.DEFINE_multi_enum(
    "upsampler_variance", None, VARIANCES[:2],
    "ddpm's variance; once for all upsamplers or once each")
_UPSAMPLER_THRESHOLD = flags.DEFINE_multi_float(
    "upsampler_threshold", None,
    "dynamic thresholding percentile; once for all upsamplers or once each")
_MAX_BATCH = flags.DEFINE_integer("max_batch", 64, "rows per compiled call")
_IMAGE = flags.DEFINE_multi_string("image", [], "an input image (manipulations)")
_CAPTION = flags.DEFINE_string("caption", None,
                               "a caption for the decoder (manipulations)")
_ETA = flags.DEFINE_float("eta", 1.0, "variations: DDIM eta (> 0 adds variety)")
_FRAMES = flags.DEFINE_integer("frames", 5, "images in an interpolation or diff")
_LATENTS = flags.DEFINE_enum(
    "latents", None, ["fixed", "inverted", "random"],
    "variations: inverted (default: the image's own DDIM-inverted x_T) or "
    "random; interpolate: fixed (default: one x_T) or inverted (slerp the "
    "inverted ones)")
_FROM_CAPTION = flags.DEFINE_string("from_caption", None, "text_diff: from")
_TO_CAPTION = flags.DEFINE_string("to_caption", None, "text_diff: to")
_MAX_THETA = flags.DEFINE_float("max_theta", 0.5, "text_diff: last fraction")


def _command(argv: list[str]) -> str:
  extra = argv[1:]
  if len(extra) > 1 or (extra and extra[0] not in COMMANDS):
    raise UserError(f"unexpected arguments {extra}; the command is one of "
                    f"{', '.join(COMMANDS)} (default generate)")
  return extra[0] if extra else "generate"


def _check_inputs(command: str) -> None:
  """The flags a command needs, checked before any workdir is loaded."""
  images = {"variations": 1, "interpolate": 2, "text_diff": 1}.get(command, 0)
  if len(_IMAGE.value) != images:
    raise UserError(f"{command} takes {images} --image flag(s), got "
                    f"{len(_IMAGE.value)}")
  if command == "generate":
    if not _PROMPT.value:
      raise UserError("no --prompt given; pass one per row of the grid")
    if not _PRIOR.value:
      raise UserError("generate needs --prior DIR (the prior's workdir)")
  latents = _LATENTS.value
  if latents is not None and latents not in {
      "variations": ("inverted", "random"),
      "interpolate": ("fixed", "inverted")}.get(command, ()):
    raise UserError(f"--latents={latents} does not apply to {command}; "
                    "variations take inverted|random, interpolate fixed|inverted")
  if command == "text_diff" and (_FROM_CAPTION.value is None
                                 or _TO_CAPTION.value is None):
    raise UserError("text_diff needs --from_caption and --to_caption")
  for name, value in (("num_images", _NUM_IMAGES.value), ("frames", _FRAMES.value),
                      ("max_batch", _MAX_BATCH.value)):
    if value < 1:
      raise UserError(f"--{name}={value}: must be >= 1")


def _one_or_each(values):
  """A repeated flag: None, one value for all upsamplers, or a list of one each."""
  return values[0] if values and len(values) == 1 else (values or None)


def _run(pipe, command: str):
  """(samples, row labels)."""
  common = dict(
      decoder_steps=_DECODER_STEPS.value, decoder_guidance=_DECODER_GUIDANCE.value,
      decoder_threshold=_DECODER_THRESHOLD.value,
      upsampler_sampler=_one_or_each(_UPSAMPLER_SAMPLER.value),
      upsampler_steps=_one_or_each(_UPSAMPLER_STEPS.value),
      upsampler_eta=_one_or_each(_UPSAMPLER_ETA.value),
      upsampler_variance=_one_or_each(_UPSAMPLER_VARIANCE.value),
      upsampler_threshold=_one_or_each(_UPSAMPLER_THRESHOLD.value))
  # The manipulations decode by DDIM themselves and refuse these in one line.
  decoder_sampler = dict(decoder_sampler=_DECODER_SAMPLER.value,
                         decoder_eta=_DECODER_ETA.value,
                         decoder_variance=_DECODER_VARIANCE.value)
  images = _IMAGE.value
  latents = _LATENTS.value or _LATENTS_DEFAULT.get(command)
  if command == "generate":
    samples = pipe.generate(
        _PROMPT.value, _NUM_IMAGES.value, _SEED.value,
        prior_sampler=_PRIOR_SAMPLER.value, prior_steps=_PRIOR_STEPS.value,
        prior_guidance=_PRIOR_GUIDANCE.value,
        prior_candidates=_PRIOR_CANDIDATES.value, prior_eta=_PRIOR_ETA.value,
        prior_variance=_PRIOR_VARIANCE.value, **decoder_sampler, **common)
    return samples, list(_PROMPT.value)
  strip = dict(caption=_CAPTION.value, **decoder_sampler, **common)
  if command == "variations":
    samples = pipe.variations(images[0], _NUM_IMAGES.value, _ETA.value,
                              _SEED.value, latents=latents, **strip)
    return samples, [f"variations, {latents} x_T, eta {_ETA.value:g}"]
  if command == "interpolate":
    samples = pipe.interpolate(images[0], images[1], _FRAMES.value,
                               latents=latents, seed=_SEED.value, **strip)
    return samples, [f"interpolation, {latents} x_T"]
  samples = pipe.text_diff(images[0], _FROM_CAPTION.value, _TO_CAPTION.value,
                           _FRAMES.value, _MAX_THETA.value, seed=_SEED.value,
                           **strip)
  return samples, [f"{_FROM_CAPTION.value} -> {_TO_CAPTION.value}"]


def _check_out(path: str) -> None:
  """--out can be written, checked before minutes of sampling."""
  if not path:
    raise UserError("--out is required; pass --out=FILE.png")
  if os.path.isdir(path):
    raise UserError(f"--out={path} is a folder; pass a file name such as "
                    f"{os.path.join(path, 'samples.png')}")
  parent = os.path.dirname(os.path.abspath(path))
  while not os.path.exists(parent):  # write_grid creates the missing folders
    parent = os.path.dirname(parent)
  if not os.path.isdir(parent) or not os.access(parent, os.W_OK):
    raise UserError(f"cannot write --out={path}: {parent} is not a folder you can "
                    "write to; pass another --out")


def _check_texts(command: str) -> None:
  """Prompts and captions, checked before any workdir is loaded."""
  from unclip_jax.pipeline.prompts import check_prompts  # pylint: disable=import-outside-toplevel
  texts = list(_PROMPT.value) if command == "generate" else []
  texts += [t for t in (_CAPTION.value, _FROM_CAPTION.value, _TO_CAPTION.value)
            if t is not None]
  if texts:
    check_prompts(texts)


def main(argv):
  command = _command(argv)
  _check_inputs(command)
  _check_out(_OUT.value)
  _check_texts(command)
  # orbax warns at every read-only restore ("Given directory is read only"),
  # which is all this command does.
  absl_logging.set_verbosity(absl_logging.ERROR)
  # Imported here, so that --help and flag errors come back without jax.
  import numpy as np  # pylint: disable=import-outside-toplevel
  from unclip_jax.data import images as images_lib  # pylint: disable=import-outside-toplevel
  # Every --image is read (and refused in one line) before the workdirs load.
  squares = [images_lib.square_image(path) for path in _IMAGE.value]
  from unclip_jax.pipeline import UnCLIPPipeline  # pylint: disable=import-outside-toplevel

  pipe = UnCLIPPipeline.from_workdirs(
      clip=_CLIP.value, prior=_PRIOR.value, decoder=_DECODER.value,
      upsamplers=_UPSAMPLER.value, max_batch=_MAX_BATCH.value)
  samples, labels = _run(pipe, command)
  side = pipe.resolution
  shown = [images_lib.resize_image(square, side) for square in squares]
  tiles = samples.images
  if command == "interpolate":  # a, frames, b
    tiles = np.concatenate([shown[:1], tiles, shown[1:]])
  elif shown:
    tiles = np.concatenate([shown, tiles])
  rows = len(labels)
  tiles = images_lib.nearest_upscale(tiles, max(1, -(-_MIN_TILE // side)))
  print(images_lib.write_grid(_OUT.value, tiles, rows=rows, cols=len(tiles) // rows,
                        labels=labels))


if __name__ == "__main__":
  flags.mark_flags_as_required(["clip", "decoder", "out"])
  cli.run(main)
