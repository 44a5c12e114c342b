"""python -m unclip_jax.train --config configs/<stage>.py:<preset> --workdir DIR"""
from absl import flags
from ml_collections import config_flags

from unclip_jax import cli

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "configs/<stage>.py:<preset>", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "where the run lives")


def main(argv):
  del argv
  from unclip_jax.train import loop  # after flags, so --help stays fast
  loop.train(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
  flags.mark_flags_as_required(["config", "workdir"])
  cli.run(main)
