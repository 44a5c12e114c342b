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


class DamagedCheckpoint(WorkdirError):
  """A checkpoint with a missing, truncated or garbled file, or an unfinished
  write; readers fall back to an older checkpoint."""

  def __init__(self, step: int, step_dir: str, problem: str):
    super().__init__(f"checkpoint {step} is damaged ({problem}); move {step_dir} "
                     "aside to use an older checkpoint")
    self.step = step
    self.step_dir = step_dir
    self.problem = problem  # "file: what is wrong with it"


class Diverged(UserError):
  """Training produced non-finite values: the loss or gradients for too many
  steps in a row, or the train state about to be saved."""


class ConversionError(UserError):
  """A source checkpoint that does not match the architecture it is converted
  to: a tensor missing, left unused or of the wrong shape (named)."""
