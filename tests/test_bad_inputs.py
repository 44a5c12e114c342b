"""Bad input, every case in one table (docs/reliability.md lists them): each is
refused with one line naming the problem and the fix, a UserError subclass in
Python and `error: ...` with exit status 2 on the command line.

The cases run in-process (validation functions, the entry points' flag parsing
and main functions, the Python API; tests/bad_input_helpers.py runs each kind);
a handful run as real subprocesses to see what a user sees: exit status 2, one
stderr line, no traceback, and the traceback with --debug."""
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from configs import clip as clip_config
from tests.bad_input_helpers import (
    SAMPLE_WORKDIRS, Case, Env, common, compile_, dataset, fake_prior_run,
    full_disk, mismatched_prior, sample, tiny, train_flags, train_on_previous,
    unwritable_workdir, validate, variations, write_image_files)
from unclip_jax.convert import clip as clip_convert
from unclip_jax.convert import karlo as karlo_convert
from unclip_jax.errors import ConfigError, ConversionError, UserError, WorkdirError
from unclip_jax.generators import decoder as decoder_generator
from unclip_jax.pipeline import IncompatibleStagesError, UnCLIPPipeline
from unclip_jax.train import config_checks

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REFERENCE = os.path.join(ROOT, "docs", "reliability.md")

CLIP_JSON = clip_config.get_config("tiny")
CASES = [
    # train: config values and combinations
    Case("mesh-shape", common({"mesh.shape": (3, 1, 1)}), ConfigError,
         "mesh shape (3, 1, 1) does not divide 8 devices; set --config.mesh.shape"),
    Case("mesh-two-rest", common({"mesh.shape": (-1, -1, 1)}), ConfigError,
         "at most one -1"),
    Case("mesh-dcn-shape", common({"mesh.dcn_shape": (2, 1, 1)}), ConfigError,
         "mesh.dcn_shape=(2, 1, 1) spreads the mesh over 2 slices, but the 8 "
         "devices form 1; set --config.mesh.dcn_shape"),
    Case("mesh-dcn-shape-3", common({"mesh.dcn_shape": (3, 1, 1)}), ConfigError,
         "set --config.mesh.dcn_shape so its sizes multiply to 1"),
    Case("batch-data-parallel", common({"batch_size": 12}), ConfigError,
         "batch_size=12 does not divide over 8 data-parallel shards"),
    Case("batch-accumulation", common({"optim.grad_accum_steps": 3}),
         ConfigError, "does not split into optim.grad_accum_steps=3"),
    Case("dtype", common({"dtype": "float16"}), ConfigError,
         "dtype='float16': use one of ['bfloat16', 'float32']"),
    Case("total-steps", common({"total_steps": 0}), ConfigError,
         "total_steps=0 must be > 0; set --config.total_steps"),
    Case("unet-downsampling",
         validate("upsampler", {"data.resolution": 20, "model.low_res": 10,
                                "model.channel_mults": (1, 2, 2, 2)}),
         ConfigError, "data.resolution = 20 is not divisible by 8"),
    Case("attention-resolution",
         lambda env: decoder_generator.validate_config(
             tiny("decoder", {"model.attention_resolutions": (3,)})),
         ConfigError, "model.attention_resolutions [3] are not feature-map sides"),
    Case("unknown-dataset", dataset("emoji_scene"), ConfigError,
         "data.name='emoji_scene' is no dataset (did you mean 'emoji_scenes'?)"),
    Case("unprepared-dataset", dataset("mnist"), ConfigError,
         "data.name='mnist' is not prepared in"),
    Case("clip-workdir-unset", validate("prior", {}), ConfigError,
         "clip_workdir is not set; pass --config.clip_workdir=DIR"),
    Case("clip-workdir-missing",
         validate("decoder", {"clip_workdir": "{tmp}/nowhere"}), WorkdirError,
         "nowhere does not exist; pass a CLIP workdir"),
    Case("clip-workdir-wrong-stage",
         lambda env: validate("prior", {"clip_workdir": fake_prior_run(env)})(env),
         WorkdirError, "holds a 'prior' run, not a 'clip' run"),
    Case("data-differs-between-stages",
         lambda env: validate("prior", {"clip_workdir": env.chain.clip,
                                        "data.resolution": 32})(env),
         ConfigError, "data.resolution=32 but the CLIP in"),
    # train: flags and config files
    Case("unknown-preset", train_flags("--config=configs/clip.py:huge",
                                       "--workdir={tmp}/w"), UserError,
         "--config=configs/clip.py:huge: unknown preset 'huge': use tiny, demo "
         "or paper"),
    Case("unknown-field", train_flags("--config=configs/clip.py:tiny",
                                      "--config.optim.lrr=1", "--workdir=w"),
         UserError, "no such field 'lrr'; did you mean \"lr\""),
    Case("field-below-a-value", train_flags("--config=configs/clip.py:tiny",
                                            "--config.optim.lr.x=1", "--workdir=w"),
         UserError, "optim.lr is a value, not a group of fields, so it has no "
         "field 'x'; override --config.optim.lr itself"),
    Case("field-type", train_flags("--config=configs/clip.py:tiny",
                                   "--config.batch_size=abc", "--workdir=w"),
         UserError, "--config.batch_size=abc: not a whole number"),
    Case("config-file-missing", train_flags("--config=configs/nope.py:tiny",
                                            "--workdir=w"), UserError,
         "cannot load the --config file: No such file or directory"),
    Case("config-file-not-python", train_flags("--config=README.md",
                                               "--workdir=w"), UserError,
         "the --config file is not Python"),
    Case("unknown-flag", train_flags("--config=configs/clip.py:tiny",
                                     "--wrkdir=w"), UserError,
         "Unknown command line flag 'wrkdir'. Did you mean: workdir ?"),
    Case("missing-workdir-flag", train_flags("--config=configs/clip.py:tiny"),
         UserError, "--workdir is required"),
    # train: workdir problems found at start
    Case("workdir-is-a-file",
         lambda env: config_checks.prepare_workdir(tiny("clip"), __file__),
         WorkdirError, "is a file, not a folder"),
    Case("workdir-unwritable", unwritable_workdir, WorkdirError,
         "cannot write to --workdir="),
    Case("workdir-of-another-stage", train_on_previous(tiny("prior")),
         WorkdirError, "holds a prior run, not a clip run; pass another --workdir"),
    Case("workdir-model-changed",
         train_on_previous(CLIP_JSON, {"model.vision_width": 64}), WorkdirError,
         "was trained with model.vision_width=32, this config has "
         "model.vision_width=64"),
    Case("workdir-tokenizer-changed",
         train_on_previous(CLIP_JSON, {"tokenizer.vocab_size": 512}), WorkdirError,
         "holds a run with a different tokenizer: it was trained with "
         "tokenizer.vocab_size=256"),
    Case("workdir-data-changed",
         train_on_previous(CLIP_JSON, {"data.num_emoji": 4}), WorkdirError,
         "holds a run with different data"),
    Case("workdir-clipping-toggled",
         train_on_previous(CLIP_JSON, {"optim.grad_clip": 0.0}), WorkdirError,
         "a different optimizer state: it was trained with optim.grad_clip=1.0"),
    Case("workdir-config-garbled", train_on_previous("{not json"), WorkdirError,
         "config.json (Expecting property name"),
    Case("disk-too-full", full_disk, WorkdirError,
         "has 1.0 MiB free, but one checkpoint of this run takes about 20.4 MiB; "
         "free some space or pass a --workdir on a larger disk"),
    # sample: flags, prompts, images, --out (all before any workdir loads)
    Case("sample-no-prompt", sample(*SAMPLE_WORKDIRS, "--prior=p"), UserError,
         "no --prompt given"),
    Case("sample-no-prior", sample(*SAMPLE_WORKDIRS, "--prompt=a"), UserError,
         "generate needs --prior DIR"),
    Case("sample-num-images", sample(*SAMPLE_WORKDIRS, "--prior=p", "--prompt=a",
                                     "--num_images=0"), UserError,
         "--num_images=0: must be >= 1"),
    Case("sample-num-images-type", sample(*SAMPLE_WORKDIRS, "--num_images=abc"),
         UserError, "--num_images=abc: not a whole number"),
    Case("sample-unknown-sampler", sample(*SAMPLE_WORKDIRS,
                                          "--decoder_sampler=euler"), UserError,
         "--decoder_sampler=euler: value should be one of <ddim|ddpm|analytic>"),
    Case("sample-unknown-command", sample("sideways", *SAMPLE_WORKDIRS),
         UserError, "the command is one of generate, variations"),
    Case("sample-latents", variations("--image=x.png", "--latents=fixed"),
         UserError, "--latents=fixed does not apply to variations"),
    Case("sample-no-image", variations(), UserError,
         "variations takes 1 --image flag(s), got 0"),
    Case("sample-text-diff-captions", sample("text_diff", *SAMPLE_WORKDIRS,
                                             "--image=x.png"), UserError,
         "text_diff needs --from_caption and --to_caption"),
    Case("out-missing", sample("--clip=c", "--decoder=d", "--prior=p",
                               "--prompt=a"), UserError, "--out is required"),
    Case("out-under-a-file", sample("--clip=c", "--decoder=d", "--prior=p",
                                    "--prompt=a", f"--out={__file__}/x.png"),
         UserError, "is not a folder you can write to; pass another --out"),
    Case("out-is-a-folder", sample("--clip=c", "--decoder=d", "--prior=p",
                                   "--prompt=a", "--out={tmp}"), UserError,
         "is a folder; pass a file name such as"),
    Case("prompt-control-characters",
         sample(*SAMPLE_WORKDIRS, "--prior=p", "--prompt=red\x1b[31mapple"),
         UserError, "contains the control character U+001B; remove it"),
    Case("prompt-10k-characters",
         sample(*SAMPLE_WORKDIRS, "--prior=p", "--prompt=" + "a" * 10_000),
         UserError, "is 10000 characters long; the stages read only its first"),
    Case("caption-control-characters",
         variations("--image=x.png", "--caption=a\x00b"), UserError,
         "contains the control character U+0000"),
    Case("image-missing", variations("--image={tmp}/nowhere.png"), UserError,
         "nowhere.png; check the path"),
    Case("image-not-an-image", variations("--image={images}/not_an_image.png"),
         UserError, "as an image (not a format PIL reads); pass a PNG or JPEG"),
    Case("image-empty-file", variations("--image={images}/empty.png"), UserError,
         "as an image (not a format PIL reads)"),
    Case("image-a-folder", variations("--image={images}"), UserError,
         "is a folder, not an image"),
    Case("image-1x1", variations("--image={images}/one_pixel.png"), UserError,
         "one_pixel.png is 1x1 px, too small to show anything; pass one at least 8 px"),
    Case("image-floating-point", variations("--image={images}/float.tiff"),
         UserError, "float.tiff is floating-point (mode F), which has no fixed range"),
    Case("image-32-bit", variations("--image={images}/int32.tiff"), UserError,
         "int32.tiff (mode I) holds values outside 0..65535; save it as an 8-bit"),
    Case("sample-wrong-stage-workdir",
         lambda env: sample(f"--clip={fake_prior_run(env)}", "--decoder=d",
                            "--prior=p", "--prompt=a", "--out={tmp}/o.png")(env),
         WorkdirError, "holds a 'prior' run, not a 'clip' run; pass the clip"),
    # compile
    Case("compile-mesh", compile_("--config=configs/clip.py:tiny",
                                  "--topology=v5e-8", "--mesh=3,1,1"), UserError,
         "--mesh=3,1,1: use data,fsdp,tensor sizes that multiply to the slice's 8"),
    Case("compile-mesh-syntax", compile_("--config=configs/clip.py:tiny",
                                         "--topology=v5e-8", "--mesh=3,x"),
         UserError, "--mesh=3,x: use data,fsdp,tensor sizes"),
    Case("compile-topology", compile_("--config=configs/clip.py:tiny",
                                      "--topology=v9x-3"), UserError,
         "--topology='v9x-3': use a Cloud TPU name"),
    Case("compile-hbm", compile_("--config=configs/clip.py:tiny",
                                 "--topology=v5e-8", "--hbm_gib=0"), UserError,
         "--hbm_gib=0.0: must be > 0"),
    Case("compile-unknown-preset", compile_("--config=configs/decoder.py:huge",
                                            "--topology=v5e-8"), UserError,
         "unknown preset 'huge'"),
    # the Python API
    Case("api-prompts-not-text", lambda env: env.pipe(5), UserError,
         "prompts must be a string or a list of strings; got int"),
    Case("api-prompt-bytes", lambda env: env.pipe(b"red apple"), UserError,
         "prompts must be str, not bytes; decode them first"),
    Case("api-prompt-only-emoji", lambda env: env.pipe("🍎"), UserError,
         "has no character the tokenizer knows, so every stage would read it as "
         "unknown tokens; describe it in words (🍎 is 'red apple')"),
    Case("api-prompt-lone-surrogate", lambda env: env.pipe("a\ud800"), UserError,
         "contains a lone surrogate (no text) U+D800"),
    Case("api-no-prompts", lambda env: env.pipe([]), UserError,
         "no prompts given"),
    Case("api-num-images", lambda env: env.pipe("a", num_images=0), UserError,
         "num_images must be a whole number >= 1, got 0"),
    Case("api-seed", lambda env: env.pipe("a", seed="x"), UserError,
         "seed must be a whole number"),
    Case("api-encode-not-an-image",
         lambda env: env.pipe.encode_images(f"{env.images}/not_an_image.png"),
         UserError, "not_an_image.png as an image (not a format PIL reads)"),
    Case("api-variations-not-an-image",
         lambda env: env.pipe.variations(f"{env.images}/not_an_image.png"),
         UserError, "not_an_image.png as an image"),
    Case("api-image-float-array",
         lambda env: env.pipe.encode_images(np.zeros((16, 16, 3), np.float32)),
         UserError, "images must be uint8 (0..255); got float32"),
    Case("api-image-shape",
         lambda env: env.pipe.encode_images(np.zeros((16, 16, 2), np.uint8)),
         UserError, "images must be [H, W, 3] (RGB) or [H, W, 4] (RGBA)"),
    Case("api-image-none", lambda env: env.pipe.encode_images(None), UserError,
         "got NoneType, not an image"),
    Case("api-image-0x0",
         lambda env: env.pipe.encode_images(np.zeros((0, 0, 3), np.uint8)),
         UserError, "an image is 0x0 px, too small"),
    Case("api-decode-nan",
         lambda env: env.pipe.decode(np.full((1, 32), np.nan)), UserError,
         "image_embeddings hold NaN or inf"),
    Case("api-decode-width", lambda env: env.pipe.decode(np.zeros((2, 5))),
         UserError, "image_embeddings must be [N >= 1, 32]"),
    Case("api-no-decoder",
         lambda env: UnCLIPPipeline.from_workdirs(clip=env.chain.clip),
         UserError, "no decoder workdir given; pass decoder=DIR"),
    Case("api-widths-differ", mismatched_prior, IncompatibleStagesError,
         "the prior was trained on a CLIP with embed_dim=64, this CLIP has 32; "
         "pass the CLIP it was trained on"),
    Case("api-decoder-of-another-stage",
         lambda env: UnCLIPPipeline.from_workdirs(
             **{**env.chain.as_kwargs(), "decoder": env.chain.upsampler}),
         WorkdirError, "holds a 'upsampler' run, not a 'decoder' run"),
    Case("api-unknown-option",
         lambda env: env.pipe("a", decoder_stpes=3), UserError,
         "generate has no option 'decoder_stpes'"),
    # convert
    Case("convert-not-karlo",
         lambda env: karlo_convert.convert(env.images, f"{env.tmp}/out"),
         ConversionError, "is --src a Karlo checkpoint in diffusers' layout?"),
    Case("convert-missing-src",
         lambda env: clip_convert.convert_any(f"{env.tmp}/nothing", f"{env.tmp}/out"),
         ConversionError, "/nothing does not exist"),
    Case("convert-out-not-empty",
         lambda env: clip_convert.convert_any(env.images, env.images),
         ConversionError, "exists and is not empty; pass a new --out directory"),
    Case("convert-state-dict-without-vocab",
         lambda env: clip_convert.convert_any(
             np.save(f"{env.tmp}/clip.npy", 0) or f"{env.tmp}/clip.npy",
             f"{env.tmp}/out"),
         ConversionError, "is a state dict file: pass the folder with its vocab.json"),
]


@pytest.fixture(scope="module")
def image_files(tmp_path_factory) -> str:
  return write_image_files(tmp_path_factory.mktemp("images"))


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input_is_one_line(case, image_files, tmp_path, request,
                               monkeypatch):
  monkeypatch.chdir(ROOT)  # the cases name config files as a user would
  env = Env(tmp=str(tmp_path), images=image_files, request=request)
  with pytest.raises(case.error) as raised:
    case.run(env)
  message = str(raised.value)
  assert case.message in message
  assert "\n" not in message and "Traceback" not in message


# The images that are converted, not refused, and the pixel each becomes.
CONVERTED = {"rgba.png": 255, "la.png": 100, "l.png": 100, "p.png": 0,
             "one_bit.png": 255, "cmyk.jpg": 255, "sixteen_bit.png": 100}


def test_images_in_other_modes_are_converted(pipe, image_files):
  from unclip_jax.data import images as images_lib
  for name, value in CONVERTED.items():
    square = images_lib.square_image(os.path.join(image_files, name))
    assert square.dtype == np.uint8 and square.shape == (16, 16, 3), name
    assert abs(int(square[0, 0, 0]) - value) <= 1, (name, square[0, 0])
  arrays = [np.full((16, 16, 3), 257 * 100, np.uint16), np.ones((16, 16, 1), bool)]
  for array, value in zip(arrays, (100, 255)):
    assert images_lib.square_image(array)[0, 0, 0] == value
  paths = [os.path.join(image_files, name) for name in CONVERTED]
  assert pipe.encode_images(paths).shape == (len(paths), pipe.clip.embed_dim)


def test_a_resumed_run_may_change_logging_eval_steps_and_speed(tmp_path):
  config = tiny("clip")
  config_checks.prepare_workdir(config, str(tmp_path))
  for dotted, value in {"total_steps": 100, "log_every": 7, "eval_every": 9,
                        "checkpoint_every": 11, "eval.num_groups": 1,
                        "optim.lr": 0.1, "optim.grad_clip": 0.5,
                        "batch_size": 32, "mesh.shape": (2, 2, 2),
                        "model.remat_policy": "full", "dtype": "bfloat16"}.items():
    config = tiny("clip", {dotted: value})
    config_checks.prepare_workdir(config, str(tmp_path))
  with open(tmp_path / "config.json") as f:
    assert json.load(f)["dtype"] == "bfloat16"  # the latest run's, for readers


def test_one_checkpoint_is_the_state_with_a_margin(tmp_path):
  state = {"params": jax.ShapeDtypeStruct((1024, 1024), np.float32),
           "step": jax.ShapeDtypeStruct((), np.int32)}
  assert config_checks.checkpoint_bytes(state) == int(
      (4 * 2**20 + 4) * 1.1) + 16 * 2**20
  config_checks.check_disk_space(str(tmp_path / "new" / "run"), state)  # fits


# Through a real process: exit status 2, exactly one line on stderr, no
# traceback. Each starts Python (and most of them jax): a handful only.
COMMAND_LINES = {
    "train-unknown-preset": (
        ["unclip_jax.train", "--config=configs/clip.py:huge", "--workdir={tmp}/w"],
        "error: --config=configs/clip.py:huge: unknown preset 'huge'"),
    "sample-image-not-an-image": (
        ["unclip_jax.sample", "variations", "--clip=c", "--decoder=d",
         "--image={images}/not_an_image.png", "--out={tmp}/o.png"],
        "error: cannot read {images}/not_an_image.png as an image"),
    "demo-workdir-is-a-file": (
        ["unclip_jax.demo", f"--workdir={__file__}"],
        f"error: --workdir={__file__} is a file, not a folder"),
    "demo-num-images": (["unclip_jax.demo", "--workdir={tmp}/demo", "--num_images=0"],
                        "error: --num_images=0: must be >= 1"),
    "bench-two-benchmarks": (["unclip_jax.bench", "train_step", "sampling"],
                             "error: one benchmark at a time; got train_step sampling"),
    "bench-steps": (["unclip_jax.bench", "train_step", "--steps=0"],
                    "error: --steps=0: must be >= 1"),
    "convert-no-command": (
        ["unclip_jax.convert", "--src={tmp}", "--out={tmp}/out"],
        "error: say what to convert: python -m unclip_jax.convert"),
    "compile-mesh-chips": (["unclip_jax.compile", "--config=configs/clip.py:tiny",
                      "--topology=v5e-8", "--mesh=3,1,1"], "error: --mesh=3,1,1: use"),
}


def _run(argv, tmp_path, image_files):
  argv = [a.format(tmp=tmp_path, images=image_files) for a in argv]
  return subprocess.run([sys.executable, "-m", *argv], cwd=ROOT, text=True,
                        capture_output=True, timeout=120, check=False,
                        env={**os.environ, "JAX_PLATFORMS": "cpu"})


@pytest.mark.parametrize("command", list(COMMAND_LINES))
def test_a_user_sees_one_line_and_exit_status_2(command, tmp_path, image_files):
  argv, first_words = COMMAND_LINES[command]
  done = _run(argv, tmp_path, image_files)
  assert done.returncode == 2, done.stderr
  lines = done.stderr.strip().splitlines()
  assert len(lines) == 1, done.stderr
  assert lines[0].startswith(first_words.format(images=image_files)), lines


def test_debug_shows_the_traceback(tmp_path, image_files):
  argv, _ = COMMAND_LINES["train-unknown-preset"]
  done = _run([*argv, "--debug"], tmp_path, image_files)
  assert done.returncode != 0
  assert "Traceback (most recent call last)" in done.stderr
  assert "configs/clip.py" in done.stderr  # where the preset was refused


def test_every_case_is_in_the_reference():
  with open(REFERENCE) as f:
    reference = f.read()
  missing = [name for name in [c.name for c in CASES] + list(COMMAND_LINES)
             if f"`{name}`" not in reference]
  assert not missing, f"docs/reliability.md lacks {missing}"
