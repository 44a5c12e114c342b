"""Errors a user can fix: the CLI prints them as one line, no traceback."""


class UserError(ValueError):
  """Bad input that the message says how to fix."""


class ConfigError(UserError):
  """A config value that cannot work; raised before anything compiles."""


class WorkdirError(UserError):
  """A workdir that is missing, of another stage, or from another config."""


class Preempted(Exception):
  """Training stopped at a step every process agreed on, after a SIGTERM (a
  pod's preemption notice), with a checkpoint there: the same command resumes."""
