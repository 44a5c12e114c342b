"""Benchmarks (speed goals are checked here, never in timed tests).

  python -m unclip_jax.bench ceiling
      this machine's matmul rates: f32, bf16 x bf16 -> f32, bf16 -> bf16.
  python -m unclip_jax.bench convolutions [--batch 8] [--repeats 5]
      3x3 convolution GFLOP/s at the UNet's levels, with our compiler
      options and with XLA's defaults.
  python -m unclip_jax.bench train_step --config configs/decoder.py:demo \\
      [--clip_config configs/clip.py:demo] [--data synthetic|real] [--steps 10]
      [--repeats 5] [--workdir DIR]
      a stage's real train step: step time (median, min, max), compile
      seconds, FLOPs and MFU (against the measured ceiling on a CPU).
  python -m unclip_jax.bench sampling --config configs/prior.py:demo \\
      [--clip_config configs/clip.py:demo] [--batch 16] [--sampling_steps N]
      [--workdir TRAINED_DIR]
      a generator's compiled sampler: seconds per item.
  python -m unclip_jax.bench prior_sampling ...   (sampling, for a prior config)
  python -m unclip_jax.bench chain --clip W --prior W --decoder W \\
      [--upsampler W ...] [--num_prompts 4]
      prompts per second through trained workdirs.

A prior or decoder needs its CLIP's sizes: --clip_config, by default
configs/clip.py with the --config preset. Each prints one JSON line.
"""
import json

from absl import flags
from ml_collections import config_flags

from unclip_jax import cli
from unclip_jax.errors import UserError

_CONFIG = config_flags.DEFINE_config_file("config", None, "stage config")
_CLIP_CONFIG = config_flags.DEFINE_config_file(
    "clip_config", None, "the CLIP a prior or decoder reads (default: "
    "configs/clip.py with the --config preset)")
_DATA = flags.DEFINE_enum("data", "synthetic", ["synthetic", "real"],
                          "train_step: an in-memory batch, or the stage's data")
_STEPS = flags.DEFINE_integer("steps", 10, "train steps per timed repeat")
_REPEATS = flags.DEFINE_integer("repeats", 5, "timed repeats (median, min, max)")
_BATCH = flags.DEFINE_integer(
    "batch", None, "rows per sampling call (default 16), images per convolution (8)")
_SAMPLING_STEPS = flags.DEFINE_integer("sampling_steps", None,
                                       "sampling steps (default: the config's)")
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "train_step --data real: scratch workdir (tokenizer, "
    "caches); sampling: a trained workdir to sample from")
_CLIP = flags.DEFINE_string("clip", None, "chain: CLIP workdir")
_PRIOR = flags.DEFINE_string("prior", None, "chain: prior workdir")
_DECODER = flags.DEFINE_string("decoder", None, "chain: decoder workdir")
_UPSAMPLERS = flags.DEFINE_multi_string("upsampler", [], "chain: upsampler "
                                        "workdirs, low to high resolution")
_NUM_PROMPTS = flags.DEFINE_integer("num_prompts", 4, "chain: prompts per call")

COMMANDS = ("ceiling", "convolutions", "train_step", "sampling", "prior_sampling", "chain")


def check_request(commands: list[str], **counts: int | None) -> str:
  """The benchmark the positional arguments name (default train_step), after
  one-line errors for several of them or a count (--steps, ...) below 1."""
  if len(commands) > 1:
    raise UserError(f"one benchmark at a time; got {' '.join(commands)}")
  command = commands[0] if commands else "train_step"
  if command not in COMMANDS:
    raise UserError(f"unknown benchmark {command!r}; use one of {', '.join(COMMANDS)}")
  for name, value in counts.items():
    if value is not None and value < 1:
      raise UserError(f"--{name}={value}: must be >= 1")
  return command


def _clip_config(config):
  """--clip_config, or configs/clip.py with the --config preset; None for a
  stage that reads no CLIP."""
  from unclip_jax import stages  # pylint: disable=import-outside-toplevel
  if not stages.get_stage(config.stage).reads_clip:
    return None
  if _CLIP_CONFIG.value is not None:
    return _CLIP_CONFIG.value
  return cli.default_clip_config("demo")


def _config():
  if _CONFIG.value is None:
    raise UserError("this benchmark needs --config configs/<stage>.py:<preset>")
  return _CONFIG.value


def main(argv):
  command = check_request(argv[1:], steps=_STEPS.value, repeats=_REPEATS.value,
                          batch=_BATCH.value, num_prompts=_NUM_PROMPTS.value,
                          sampling_steps=_SAMPLING_STEPS.value)
  # Imported after the flags are parsed: --help stays fast.
  from unclip_jax.bench import convolutions, sampling, timing, train_step  # pylint: disable=import-outside-toplevel
  if command == "ceiling":
    result = {"benchmark": "ceiling", **timing.ceilings()}
  elif command == "convolutions":
    result = convolutions.bench_convolutions(batch_size=_BATCH.value or 8,
                                             repeats=_REPEATS.value)
  elif command == "train_step":
    result = train_step.bench_train_step(
        _config(), _clip_config(_config()), data=_DATA.value, workdir=_WORKDIR.value,
        steps=_STEPS.value, repeats=_REPEATS.value)
  elif command in ("sampling", "prior_sampling"):
    config = _config()
    if command == "prior_sampling" and config.stage != "prior":
      raise UserError("prior_sampling takes a prior config; use `sampling` for "
                      f"a {config.stage}")
    result = sampling.bench_sampling(
        config, _clip_config(config), batch_size=_BATCH.value or 16,
        num_steps=_SAMPLING_STEPS.value, repeats=_REPEATS.value,
        workdir=_WORKDIR.value)
  else:
    if not (_CLIP.value and _PRIOR.value and _DECODER.value):
      raise UserError("chain needs --clip, --prior and --decoder workdirs")
    result = sampling.bench_chain(clip=_CLIP.value, prior=_PRIOR.value,
                                  decoder=_DECODER.value,
                                  upsamplers=_UPSAMPLERS.value,
                                  num_prompts=_NUM_PROMPTS.value,
                                  repeats=_REPEATS.value)
  print(json.dumps({k: (round(v, 5) if isinstance(v, float) else v)
                    for k, v in result.items()}))


if __name__ == "__main__":
  cli.run(main)
