"""What every command-line entry point shares: flag errors and user errors as
one line (exit 2), and our progress lines at INFO over quiet libraries."""
import logging
import signal
import sys
from typing import Callable

from absl import app, flags
from absl import logging as absl_logging

from unclip_jax.errors import Preempted, UserError


def _one_line(error: BaseException) -> str:
  text = str(error).strip()
  if "Traceback" in text:  # a config file raised: its last line says why
    text = text.splitlines()[-1]
  text = text.replace("\\n", " ").replace("\\'", "'").strip("'\" ")
  return " ".join(text.split())


def _parse_flags(argv):
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    sys.exit(f"error: {_one_line(e)}")
  except (AttributeError, KeyError, ValueError, TypeError) as e:
    # ml_collections raises these for an unknown field, a bad preset or a
    # value of the wrong type in --config / --config.a.b=v.
    text = _one_line(e)
    if isinstance(e, AttributeError):  # ml_collections: "'lrr' Did you mean"
      text = "no such field '" + text.replace("' ", "'. ", 1)
    sys.exit(f"error: bad --config: {text}")


def _setup_logging() -> None:
  absl_logging.set_verbosity(absl_logging.WARNING)  # orbax is chatty at INFO
  handler = logging.StreamHandler()
  handler.setFormatter(logging.Formatter("%(asctime)s %(message)s",
                                         "%H:%M:%S"))
  ours = logging.getLogger("unclip_jax")
  ours.addHandler(handler)
  ours.setLevel(logging.INFO)
  ours.propagate = False


def default_clip_config(fallback_preset: str):
  """configs/clip.py with the preset of --config (`...prior.py:paper` ->
  `clip.py:paper`; `fallback_preset` when --config names none): the CLIP whose
  sizes a prior or decoder takes when no --clip_config is given."""
  from configs import clip as clip_configs  # pylint: disable=import-outside-toplevel
  from ml_collections import config_flags  # pylint: disable=import-outside-toplevel
  filename = config_flags.get_config_filename(flags.FLAGS["config"])
  preset = filename.split(":", 1)[1] if ":" in filename else fallback_preset
  try:
    return clip_configs.get_config(preset)
  except ValueError:
    raise UserError(f"configs/clip.py has no preset {preset!r}; pass "
                    "--clip_config configs/clip.py:<preset>") from None


def run(main: Callable[[list[str]], None]) -> None:
  """absl's app.run, with one-line errors for what the user can fix."""
  def wrapped(argv):
    _setup_logging()
    # Imported here, after the flags: --help stays fast.
    from unclip_jax.parallel import distributed  # pylint: disable=import-outside-toplevel
    distributed.use_cpu_unless_accelerated()
    try:
      main(argv)
    except UserError as e:
      print(f"error: {_one_line(e)}", file=sys.stderr)
      sys.exit(2)
    except Preempted as e:
      print(f"stopped: {e}", file=sys.stderr)
      sys.exit(128 + signal.SIGTERM)  # as if the signal had ended it
  app.run(wrapped, flags_parser=_parse_flags)
