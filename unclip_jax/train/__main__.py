"""python -m unclip_jax.train --config configs/<stage>.py:<preset> --workdir DIR
    [--config.<field>=<value> ...]"""
import importlib

from absl import flags
from ml_collections import config_flags

from unclip_jax import cli

STAGES = ("clip", "prior", "decoder", "upsampler")


def usage() -> str:
  """What --help prints above the flags: the command, each config file's
  presets (read from the files) and how to override a field."""
  presets = [f"  configs/{stage}.py: "
             + ", ".join(importlib.import_module(f"configs.{stage}").PRESETS)
             for stage in STAGES]
  return "\n".join([
      __doc__, "",
      "Trains one stage in DIR; the same command on the same DIR resumes it.",
      "", "Presets (tiny: seconds; demo: the CPU demo's; paper: DALL-E 2's sizes;",
      "the upsampler's demo_64 and paper_1024 are the second stage of each):",
      *presets, "",
      "Any config field can be overridden, e.g. --config.optim.lr=3e-4",
      "--config.batch_size=64 --config.mesh.shape='(2,2,2)' (8 devices); the",
      "fields are in configs/common.py and the config file (docs/training.md).",
      ""])


_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "configs/<stage>.py:<preset>", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "where the run lives")


def main(argv):
  del argv
  from unclip_jax.train import loop  # after flags, so --help stays fast
  loop.train(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
  __doc__ = usage()  # absl's --help prints the main module's docstring
  flags.mark_flags_as_required(["config", "workdir"])
  cli.run(main)
