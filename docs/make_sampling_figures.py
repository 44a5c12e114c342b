"""Writes the PNG strips of docs/sampling.md from a demo's workdirs.

  python docs/make_sampling_figures.py --workdir DIR --out OUT_DIR

OUT_DIR (made if missing) gets sampling_text_to_image.png, sampling_variations.png,
sampling_interpolation.png and sampling_text_diff.png. There is no default: the
page's own figures are tracked files, replaced only by an explicit `--out docs`.

DIR holds clip/, prior/, decoder/ and upsampler/ (upsampler2/, ...), as
`python -m unclip_jax.demo --workdir DIR` leaves them. The prompts and the input
images are scenes every stage held out, of the emoji the decoder was trained on
(unclip_jax.demo.evaluate); each figure's first column shows the inputs.
"""
import glob
import os
import re

from absl import flags

from unclip_jax import cli

_WORKDIR = flags.DEFINE_string("workdir", None, "the demo's workdir")
_OUT = flags.DEFINE_string("out", None, "the folder the PNGs go to (made if "
                           "missing; `docs` replaces this page's figures)")
_SEED = flags.DEFINE_integer("seed", 0, "sampling seed")

_MIN_TILE = 64


def _upsamplers(workdir: str) -> list[str]:
  found = [d for d in glob.glob(os.path.join(workdir, "upsampler*"))
           if os.path.isdir(d)]
  return sorted(found, key=lambda d: int(os.path.basename(d)[9:] or 1))


def main(argv):
  del argv
  import numpy as np  # pylint: disable=import-outside-toplevel
  from unclip_jax import UnCLIPPipeline  # pylint: disable=import-outside-toplevel
  from unclip_jax.demo import evaluate  # pylint: disable=import-outside-toplevel
  from unclip_jax.data import images as images_lib  # pylint: disable=import-outside-toplevel
  from unclip_jax.train.config_checks import make_writable_dir  # pylint: disable=import-outside-toplevel

  make_writable_dir(_OUT.value, "--out")  # before minutes of sampling, not after
  root = _WORKDIR.value
  pipe = UnCLIPPipeline.from_workdirs(
      clip=os.path.join(root, "clip"), prior=os.path.join(root, "prior"),
      decoder=os.path.join(root, "decoder"), upsamplers=_upsamplers(root))
  decoder_data = pipe.stages.decoder.config.data
  held_out = evaluate.held_out_prompts(
      num_emoji=decoder_data.num_emoji, clip_num_emoji=pipe.clip.config.data.num_emoji,
      seed=decoder_data.seed)
  prompts = held_out.captions[:4]
  truth = evaluate.true_images(held_out, decoder_data.seed, pipe.clip.resolution)
  records = [{"image": truth[i], "caption": held_out.captions[i]}
             for i in range(4, 7)]
  side, seed = pipe.resolution, _SEED.value
  factor = max(1, -(-_MIN_TILE // side))

  def shown(record):
    return images_lib.resize_image(record["image"], side)

  def write(name, rows, labels):
    tiles = np.concatenate(rows)
    path = os.path.join(_OUT.value, name)
    images_lib.write_grid(path, images_lib.nearest_upscale(tiles, factor), rows=len(labels),
                    cols=len(tiles) // len(labels), labels=labels)
    print(path)

  samples = pipe.generate(prompts, num_images=4, seed=seed)
  write("sampling_text_to_image.png", [samples.images], prompts)

  variations = pipe.variations(records[0]["image"], num_images=5, seed=seed)
  write("sampling_variations.png",
        [shown(records[0])[None], variations.images], ["input, variations"])

  a, b = records[0], records[1]
  rows = []
  for latents in ("fixed", "inverted"):
    strip = pipe.interpolate(a["image"], b["image"], num_steps=5, latents=latents,
                             seed=seed)
    rows += [shown(a)[None], strip.images, shown(b)[None]]
  write("sampling_interpolation.png", rows, ["fixed x_T", "inverted x_T"])

  record = records[2]
  caption = record["caption"]  # "{name} on a {color} background in the {position}"
  color = next(c for c in ("red", "blue", "green") if f" {c} " not in caption)
  recoloured = re.sub(r"on a \w+ background", f"on a {color} background", caption)
  diff = pipe.text_diff(record["image"], caption, recoloured, num_steps=5,
                        max_theta=0.5)
  # Frame 0 decodes the image's own z_i from its inverted x_T: the reconstruction.
  write("sampling_text_diff.png", [shown(record)[None], diff.images],
        [f"-> {color} background"])


if __name__ == "__main__":
  flags.mark_flags_as_required(["workdir", "out"])
  cli.run(main)
