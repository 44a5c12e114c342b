"""Which stages the demo trains, in what order, and how it runs them.

Each stage is an ordinary `python -m unclip_jax.train` run in its own process, so
its workdir is exactly what a user would get from the train command (and what
the pipeline and the sampling CLI load). Stages that do not depend on each other
run side by side: these demo models each keep about one core busy, so on 2 cores
two stages cost about as much time as the slower. Two chains of about equal
length share the machine: CLIP then the decoder, and the two upsamplers then the
prior.
"""
import dataclasses
import importlib
import json
import os
import subprocess
import sys
import time

import configs
from unclip_jax.cli import USER_ERROR_EXIT_CODE
from unclip_jax.parallel import distributed


@dataclasses.dataclass(frozen=True)
class StageRun:
  name: str  # the workdir DIR/<name>
  after: tuple[str, ...]  # stages whose workdirs it reads
  config: str = ""  # configs/<config>.py (default: the name)
  preset: str = "demo"

  @property
  def config_name(self) -> str:
    return self.config or self.name

  def workdir(self, root: str) -> str:
    return os.path.join(root, self.name)

  def command(self, root: str) -> list[str]:
    config = os.path.join(os.path.dirname(configs.__file__),
                          f"{self.config_name}.py")
    command = [sys.executable, "-m", "unclip_jax.train",
               f"--config={config}:{self.preset}",
               f"--workdir={self.workdir(root)}"]
    if "clip" in self.after:
      command.append(f"--config.clip_workdir={os.path.join(root, 'clip')}")
    return command


# In priority order. The critical path is CLIP then the decoder; the upsamplers
# (images only) train one after the other beside the CLIP, the prior beside the
# decoder. The chain is the paper's in small: 16 px -> 32 px -> 64 px.
STAGES: tuple[StageRun, ...] = (
    StageRun("clip", after=()),
    StageRun("upsampler", after=()),
    StageRun("upsampler2", after=(), config="upsampler", preset="demo_64"),
    StageRun("decoder", after=("clip",)),
    StageRun("prior", after=("clip",)),
)
UPSAMPLERS = tuple(s.name for s in STAGES if s.config_name == "upsampler")
MAX_PARALLEL = 2  # processes at once: one per core of the 2-core demo machine


def total_steps(stage: StageRun) -> int:
  config = importlib.import_module(f"configs.{stage.config_name}")
  return int(config.get_config(stage.preset).total_steps)


def trained_steps(workdir: str) -> int:
  """The latest committed orbax checkpoint step in workdir (0: none). Orbax
  writes a step under a temporary name and renames it when complete, so a
  numeric directory is a finished checkpoint."""
  directory = os.path.join(workdir, "checkpoints")
  if not os.path.isdir(directory):
    return 0
  return max((int(n) for n in os.listdir(directory) if n.isdigit()), default=0)


def logged_step(workdir: str) -> int:
  """The last step in workdir/metrics.jsonl: how far a running stage has got."""
  path = os.path.join(workdir, "metrics.jsonl")
  try:
    with open(path, "rb") as f:
      f.seek(max(0, os.path.getsize(path) - 4096))
      lines = f.read().decode(errors="ignore").strip().splitlines()
  except OSError:
    return 0
  for line in reversed(lines):  # the last may be half written
    try:
      return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
      continue
  return 0


class StageFailed(RuntimeError):
  """A stage's process exited non-zero. `resumable`: whether rerunning the
  demo can get past it (a crash, a kill, a preemption); not so for bad input,
  whose one line (exit status 2) names the fix instead."""

  def __init__(self, message: str, resumable: bool):
    super().__init__(message)
    self.resumable = resumable


def run_all(root: str, report, stages=STAGES, max_parallel=MAX_PARALLEL
            ) -> list[str]:
  """Trains every unfinished stage, each once the stages it reads are done, at
  most `max_parallel` at a time, in `stages` order. Calls `report(event)` with a
  line to print when a stage starts or ends, and `report(progress)` every few
  seconds with {name: (step, total, steps_per_sec | None)}. Raises StageFailed
  naming the stage and its log when one exits non-zero; the others are stopped
  (a rerun resumes every stage from its last checkpoint). Returns the names of
  the stages that were already trained, and so skipped."""
  os.makedirs(os.path.join(root, "logs"), exist_ok=True)
  skipped = [s.name for s in stages
             if trained_steps(s.workdir(root)) >= total_steps(s)]
  if skipped:
    report(f"already trained (a checkpoint at the preset's last step), so "
           f"skipped: {', '.join(skipped)}")
  done = set(skipped)
  waiting = [s for s in stages if s.name not in done]
  # name -> [stage, process, log path, total steps, first logged step, its time]
  running = {}
  try:
    while waiting or running:
      for stage in list(waiting):
        if len(running) < max_parallel and set(stage.after) <= done:
          waiting.remove(stage)
          log_path = os.path.join(root, "logs", f"{stage.name}.log")
          with open(log_path, "a") as log_file:
            process = subprocess.Popen(
                stage.command(root), stdout=log_file, stderr=subprocess.STDOUT,
                env=distributed.cpu_only_unless_accelerated(os.environ))
          # The rate is measured from the first logged step on, not from the
          # start: compiling would make the first ETAs far too long.
          running[stage.name] = [stage, process, log_path, total_steps(stage),
                                 logged_step(stage.workdir(root)), None]
          report(f"training {stage.name} (log: {log_path})")
      time.sleep(2)
      progress = {}
      for name, entry in list(running.items()):
        stage, process, log_path, total, first, began = entry
        step, rate = logged_step(stage.workdir(root)), None
        if began is None and step > first:
          entry[4:] = [step, time.monotonic()]
        elif began is not None and step > first:
          rate = (step - first) / (time.monotonic() - began)
        progress[name] = (step, total, rate)
        code = process.poll()
        if code is None:
          continue
        del running[name]
        if code != 0:
          raise StageFailed(f"the {name} stage failed (exit {code}): "
                            f"{last_line(log_path)} (full log: {log_path})",
                            resumable=code != USER_ERROR_EXIT_CODE)
        done.add(name)
        report(f"{name} done")
      report(progress)
  finally:
    for _, process, *_ in running.values():
      process.terminate()
    for _, process, *_ in running.values():
      process.wait(timeout=60)
  return skipped


def training_record(names, skipped, seconds: float, previous: dict | None
                    ) -> dict:
  """demo_eval.json's account of training: which stages this run trained and
  which were already trained, and `train_seconds`: this run's time in training,
  or, where it trained nothing, the time the `previous` record gives (None if
  none does) rather than a 0 that reads as a training run."""
  if all(name in skipped for name in names):
    seconds = (previous or {}).get("train_seconds")
  known = isinstance(seconds, (int, float))
  return {"stages": {name: "already trained" if name in skipped else "trained"
                     for name in names},
          "train_seconds": round(seconds, 1) if known else None}


def last_line(path: str) -> str:
  """The log's one-line error (unclip_jax.cli's "error: ..."), else its last line."""
  with open(path, errors="ignore") as f:
    lines = [l.strip() for l in f if l.strip()]
  errors = [l for l in lines if l.startswith("error: ")]
  return (errors or lines or ["(empty log)"])[-1]
