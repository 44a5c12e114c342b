"""Errors a user can fix: the CLI prints them as one line, no traceback."""


class UserError(ValueError):
  """Bad input that the message says how to fix."""


class ConfigError(UserError):
  """A config value that cannot work; raised before anything compiles."""


class WorkdirError(UserError):
  """A workdir that is missing, of another stage, or from another config."""
