"""Sample from trained stages and write a PNG grid; prints its path.

  python -m unclip_jax.sample --clip DIR --prior DIR --decoder DIR \
      --upsampler DIR [--upsampler DIR ...] --prompt "..." [--prompt ...] \
      --num_images N --seed S --out FILE.png
  python -m unclip_jax.sample variations --image IMG [--eta 1.0] ...
  python -m unclip_jax.sample interpolate --image A --image B [--frames 5]
      [--latents fixed|inverted] ...
  python -m unclip_jax.sample text_diff --image IMG --from_caption "..."
      --to_caption "..." [--frames 5] [--max_theta 0.5] ...

`generate` (the default) writes a row per prompt; the manipulations write one
strip, the input image(s) included. See docs/sampling.md.
"""
from absl import flags
from absl import logging as absl_logging

from unclip_jax import cli
from unclip_jax.errors import UserError

COMMANDS = ("generate", "variations", "interpolate", "text_diff")
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
_PRIOR_STEPS = flags.DEFINE_integer("prior_steps", None, "default: prior config")
_PRIOR_GUIDANCE = flags.DEFINE_float("prior_guidance", None, "default: config")
_PRIOR_CANDIDATES = flags.DEFINE_integer("prior_candidates", None,
                                         "default: config")
_DECODER_STEPS = flags.DEFINE_integer("decoder_steps", None, "default: config")
_DECODER_GUIDANCE = flags.DEFINE_float("decoder_guidance", None, "default: config")
_UPSAMPLER_STEPS = flags.DEFINE_multi_integer(
    "upsampler_steps", None, "one value for all upsamplers or one each")
_MAX_BATCH = flags.DEFINE_integer("max_batch", 64, "rows per compiled call")
_IMAGE = flags.DEFINE_multi_string("image", [], "an input image (manipulations)")
_CAPTION = flags.DEFINE_string("caption", None,
                               "a caption for the decoder (manipulations)")
_ETA = flags.DEFINE_float("eta", 1.0, "variations: DDIM eta (> 0 adds variety)")
_FRAMES = flags.DEFINE_integer("frames", 5, "images in an interpolation or diff")
_LATENTS = flags.DEFINE_enum("latents", "fixed", ["fixed", "inverted"],
                             "interpolate: one x_T, or slerp the inverted ones")
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
  if command == "text_diff" and (_FROM_CAPTION.value is None
                                 or _TO_CAPTION.value is None):
    raise UserError("text_diff needs --from_caption and --to_caption")
  for name, value in (("num_images", _NUM_IMAGES.value), ("frames", _FRAMES.value),
                      ("max_batch", _MAX_BATCH.value)):
    if value < 1:
      raise UserError(f"--{name}={value}: must be >= 1")


def _upsampler_steps():
  steps = _UPSAMPLER_STEPS.value
  return steps[0] if steps and len(steps) == 1 else steps


def _run(pipe, command: str):
  """(samples, input images shown first in the strip, row labels)."""
  common = dict(decoder_steps=_DECODER_STEPS.value,
                decoder_guidance=_DECODER_GUIDANCE.value,
                upsampler_steps=_upsampler_steps())
  images = _IMAGE.value
  if command == "generate":
    samples = pipe.generate(
        _PROMPT.value, _NUM_IMAGES.value, _SEED.value,
        prior_steps=_PRIOR_STEPS.value, prior_guidance=_PRIOR_GUIDANCE.value,
        prior_candidates=_PRIOR_CANDIDATES.value, **common)
    return samples, [], list(_PROMPT.value)
  strip = dict(caption=_CAPTION.value, **common)
  if command == "variations":
    samples = pipe.variations(images[0], _NUM_IMAGES.value, _ETA.value,
                              _SEED.value, **strip)
    return samples, images, [f"variations, eta {_ETA.value:g}"]
  if command == "interpolate":
    samples = pipe.interpolate(images[0], images[1], _FRAMES.value,
                               latents=_LATENTS.value, seed=_SEED.value, **strip)
    return samples, images, [f"interpolation, {_LATENTS.value} x_T"]
  samples = pipe.text_diff(images[0], _FROM_CAPTION.value, _TO_CAPTION.value,
                           _FRAMES.value, _MAX_THETA.value, seed=_SEED.value,
                           **strip)
  return samples, images, [f"{_FROM_CAPTION.value} -> {_TO_CAPTION.value}"]


def main(argv):
  command = _command(argv)
  _check_inputs(command)
  # orbax warns at every read-only restore ("Given directory is read only"),
  # which is all this command does.
  absl_logging.set_verbosity(absl_logging.ERROR)
  # Imported here, so that --help and flag errors come back without jax.
  import numpy as np  # pylint: disable=import-outside-toplevel
  from unclip_jax.data import images as images_lib  # pylint: disable=import-outside-toplevel
  from unclip_jax.pipeline import UnCLIPPipeline  # pylint: disable=import-outside-toplevel

  pipe = UnCLIPPipeline.from_workdirs(
      clip=_CLIP.value, prior=_PRIOR.value, decoder=_DECODER.value,
      upsamplers=_UPSAMPLER.value, max_batch=_MAX_BATCH.value)
  samples, inputs, labels = _run(pipe, command)
  side = pipe.resolution
  shown = [images_lib.resize_image(images_lib.square_image(i), side) for i in inputs]
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
