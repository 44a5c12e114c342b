"""Convert published weights into unclip-jax workdirs; prints what it wrote.

  python -m unclip_jax.convert karlo --src KARLO_DIR --out OUT
      # OUT/clip, OUT/prior, OUT/decoder, OUT/upsampler; then
      # python -m unclip_jax.sample --clip OUT/clip --prior OUT/prior \
      #   --decoder OUT/decoder --upsampler OUT/upsampler --prompt "..." --out x.png
  python -m unclip_jax.convert clip --src DIR_OR_FILE --out OUT_CLIP

`karlo` reads the directory diffusers' UnCLIPPipeline.save_pretrained writes
(kakaobrain/karlo-v1-alpha as published). `clip` reads a transformers CLIP
directory (config.json, model.safetensors or pytorch_model.bin, vocab.json,
merges.txt) or an OpenAI / open_clip state dict file (.safetensors, or .pt/.bin
with torch installed; then --vocab_dir names the BPE files and --activation the
MLP's: quick_gelu for OpenAI's weights). Nothing is downloaded. See
docs/weights.md.
"""
from absl import flags

from unclip_jax import cli
from unclip_jax.errors import UserError

COMMANDS = ("karlo", "clip", "open_clip")
_SRC = flags.DEFINE_string("src", None, "the checkpoint directory or file to read")
_OUT = flags.DEFINE_string("out", None, "the new (empty) directory to write")
_VOCAB_DIR = flags.DEFINE_string(
    "vocab_dir", None, "clip from a state dict file: the folder with vocab.json "
    "and merges.txt")
_ACTIVATION = flags.DEFINE_enum(
    "activation", "quick_gelu", ("quick_gelu", "gelu"),
    "clip from a state dict file: the MLP activation (OpenAI's: quick_gelu)")
_VISION_HEADS = flags.DEFINE_integer(
    "vision_heads", None, "clip from a state dict file: image tower heads "
    "(default width / 64; open_clip's ViT-H/14: 16)")
_TEXT_HEADS = flags.DEFINE_integer(
    "text_heads", None, "clip from a state dict file: text tower heads "
    "(default width / 64)")


def main(argv):
  if len(argv) != 2 or argv[1] not in COMMANDS:
    raise UserError(f"say what to convert: python -m unclip_jax.convert "
                    f"{{{'|'.join(COMMANDS)}}} --src ... --out ...")
  # Imported here, so that --help and flag errors come back without jax.
  from unclip_jax.convert import clip as clip_convert  # pylint: disable=import-outside-toplevel
  from unclip_jax.convert import karlo  # pylint: disable=import-outside-toplevel
  if argv[1] == "karlo":
    for stage, path in karlo.convert(_SRC.value, _OUT.value).items():
      print(f"{stage}: {path}")
    return
  print(clip_convert.convert_any(_SRC.value, _OUT.value, vocab_dir=_VOCAB_DIR.value,
                                 activation=_ACTIVATION.value,
                                 vision_heads=_VISION_HEADS.value,
                                 text_heads=_TEXT_HEADS.value))


if __name__ == "__main__":
  flags.mark_flags_as_required(["src", "out"])
  cli.run(main)
