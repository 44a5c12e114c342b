"""What every command-line entry point shares: flag errors and user errors as
one line on stderr (exit 2), `--debug` for the full traceback instead, and our
progress lines at INFO over quiet libraries."""
import logging
import re
import signal
import sys
from typing import Callable

from absl import app, flags
from absl import logging as absl_logging
from ml_collections.config_flags import config_flags

from unclip_jax.errors import Preempted, UserError

USER_ERROR_EXIT_CODE = 2
_DEBUG = flags.DEFINE_bool(
    "debug", False, "on an error, show the full traceback instead of one line")
# "ValueError: ..." as the last line of a traceback, or "[Errno 2] ..." of an OSError.
_EXCEPTION_PREFIX = re.compile(
    r"^(\w+\.)*\w*(Error|Exception|Warning): |^\[Errno \d+\] ")
_REQUIRED = re.compile(r"Flag (--\w+) must have a value other than None")
# Python's words for a value that does not parse, in the user's.
_NOT_A_NUMBER = ((re.compile(r"invalid literal for int\(\) with base 10: .*"),
                  "not a whole number"),
                 (re.compile(r"could not convert string to float: .*"),
                  "not a number"))


def one_line(text: str) -> str:
  """The last line of a traceback (a config file raised: it says why), or the
  text, on one line without the exception's class name."""
  text = str(text).strip()
  if "Traceback" in text:
    text = text.splitlines()[-1]
  text = text.replace("\\n", " ").replace("\\'", "'")  # inside a repr
  return _EXCEPTION_PREFIX.sub("", " ".join(text.split()))


def flag_error_message(error: BaseException) -> str:
  """One line for a command line that does not parse: an unknown or missing
  flag, a bad value, or a --config file (or --config.a.b=v) that cannot load."""
  if isinstance(error, flags.Error):
    text = str(error)
    required = _REQUIRED.search(text)
    if required:
      return f"{required.group(1)} is required; pass {required.group(1)}=..."
    if isinstance(error, flags.UnrecognizedFlagError):
      return f"{one_line(text)} (see --help)"
    # "flag --config=configs/clip.py:huge: <the config file's traceback>"
    flag = re.match(r"flag (--[\w.]+=.*?): (.*)", text, re.DOTALL)
    if not flag:
      return one_line(text)
    reason = one_line(flag.group(2))
    for pattern, words in _NOT_A_NUMBER:
      reason = pattern.sub(words, reason)
    return f"{flag.group(1)}: {reason}"
  if isinstance(error, (AttributeError, KeyError)):  # ml_collections: --config.lrr=1
    text = one_line(str(error))
    below_a_value = re.search(r"Attempting to lookup: ([\w.]+)\.(\w+)", text)
    if below_a_value:  # --config.optim.lr.x=1: ml_collections names the type
      parent, child = below_a_value.groups()
      return (f"bad --config override: {parent} is a value, not a group of "
              f"fields, so it has no field '{child}'; override --config.{parent} "
              "itself")
    field = re.search(r"'(\w+)'", text)
    hint = re.search(r"Did you mean.*?\?", text)
    return (f"bad --config override: no such field "
            f"'{field.group(1) if field else text}'; "
            + (hint.group(0).replace("Did", "did", 1) if hint
               else "see the config file for its fields"))
  if isinstance(error, OSError):  # the config file: missing, a folder, unreadable
    reason = str(error).strip().splitlines()[-1].split("failure to load: ")[-1]
    return (f"cannot load the --config file: {one_line(reason)}; pass "
            "configs/<stage>.py:<preset>")
  if isinstance(error, SyntaxError):
    return (f"the --config file is not Python: {error.msg} ({error.filename}, "
            f"line {error.lineno}); pass configs/<stage>.py:<preset>")
  return (f"the --config file failed: {one_line(str(error))} (rerun with --debug "
          "for the traceback)")


def _load_config_files(flag_values: flags.FlagValues) -> None:
  """ml_collections defers a config file's load error (missing, a folder)
  until the config is read: read each now, while errors are flag errors."""
  for name in flag_values:
    flag = flag_values[name]
    if isinstance(flag.parser, config_flags.ConfigFileFlagParser) and (
        flag.value is not None):
      getattr(flag.value, "stage", None)


def _debug_requested(argv) -> bool:
  return any(arg in ("--debug", "--debug=true", "--debug=True", "--debug=1")
             for arg in argv)


def _exit_with_error(line: str) -> None:
  print(f"error: {line}", file=sys.stderr)
  sys.exit(USER_ERROR_EXIT_CODE)


def parse_flags(argv, flag_values: flags.FlagValues = flags.FLAGS):
  """Parses argv; raises UserError with the one line for a bad command line."""
  try:
    remaining = flag_values(argv)
    _load_config_files(flag_values)
    return remaining
  # Everything raised here comes from the command line or a config file it names.
  except Exception as e:  # pylint: disable=broad-except
    if _debug_requested(argv):
      raise
    raise UserError(flag_error_message(e)) from e


def _parse_flags(argv):
  try:
    return parse_flags(argv)
  except UserError as e:  # with --debug, parse_flags raised the original instead
    _exit_with_error(str(e))


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
  filename = config_flags.get_config_filename(flags.FLAGS["config"])
  preset = filename.split(":", 1)[1] if ":" in filename else fallback_preset
  try:
    return clip_configs.get_config(preset)
  except ValueError:
    raise UserError(f"configs/clip.py has no preset {preset!r}; pass "
                    "--clip_config configs/clip.py:<preset>") from None


def run(main: Callable[[list[str]], None]) -> None:
  """absl's app.run, with one-line errors for what the user can fix (the full
  traceback with --debug)."""
  def wrapped(argv):
    _setup_logging()
    # Imported here, after the flags: --help stays fast.
    from unclip_jax.parallel import distributed  # pylint: disable=import-outside-toplevel
    distributed.use_cpu_unless_accelerated()
    try:
      main(argv)
    except UserError as e:
      if _DEBUG.value:
        raise
      _exit_with_error(one_line(str(e)))
    except Preempted as e:
      print(f"stopped: {e}", file=sys.stderr)
      sys.exit(128 + signal.SIGTERM)  # as if the signal had ended it
  app.run(wrapped, flags_parser=_parse_flags)
