"""Multi-host on one machine: two processes of 4 CPU devices each, joined by
jax.distributed over localhost (gloo collectives), run the code a pod runs.

- the sharded train step over both processes equals the 1-device step (the
  global batch assembled from each process's half);
- `python -m unclip_jax.train` in both: a SIGTERM to one (a preemption
  notice) stops both at one saved step; `launch/local.sh --processes 2`
  resumes from it; only process 0 logs and writes metrics; every process saved
  its shards, and one process restores them onto its own 8 devices;
- a decoder on that CLIP: process 0 alone reads the frozen CLIP and builds the
  embedding caches, then both processes train, evaluate and sample.
"""
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from unclip_jax.checkpoints.manager import checkpoint_dir
from unclip_jax.checkpoints.workdir import StageWorkdir

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
NUM_PROCESSES, DEVICES_PER_PROCESS = 2, 4


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _environment(cache_dir: str) -> dict:
  env = {k: v for k, v in os.environ.items()
         if not k.startswith("JAX_") and k != "XLA_FLAGS"}
  # The second launch compiles nothing the first one did.
  return {**env, "PYTHONPATH": ROOT, "JAX_COMPILATION_CACHE_DIR": cache_dir,
          "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}


def _start_processes(args: list[str], cache_dir: str) -> list[subprocess.Popen]:
  """`python args` as each of the two processes."""
  env = _environment(cache_dir)
  env.update(JAX_PLATFORMS="cpu",
             XLA_FLAGS=f"--xla_force_host_platform_device_count={DEVICES_PER_PROCESS}",
             JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{_free_port()}",
             JAX_NUM_PROCESSES=str(NUM_PROCESSES))
  return [subprocess.Popen([sys.executable] + args, cwd=ROOT, text=True,
                           env={**env, "JAX_PROCESS_ID": str(index)},
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
          for index in range(NUM_PROCESSES)]


def _finish(processes, expected_status: int = 0, timeout: float = 600) -> list[str]:
  """The processes' outputs, after checking each exited `expected_status`."""
  try:
    outputs = [p.communicate(timeout=timeout)[0] for p in processes]
  finally:
    for p in processes:
      p.kill()
  for index, (p, output) in enumerate(zip(processes, outputs)):
    assert p.returncode == expected_status, (
        f"process {index} exited {p.returncode}:\n{output[-4000:]}")
  return outputs


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("two_process_compile_cache"))


def test_sharded_step_over_two_processes_matches_one_device(cache_dir):
  outputs = _finish(_start_processes(["-m", "tests.parallel.two_process_worker"],
                                     cache_dir))
  for index, output in enumerate(outputs):
    assert f"process {index}: two-process steps match one device" in output


def _launch(config, workdir, tfds_dir, cache_dir, *flags) -> tuple[str, str]:
  """launch/local.sh with two processes on a (2, 4, 1) mesh: (its output,
  process 1's log)."""
  result = subprocess.run(
      ["launch/local.sh", "--fake-devices", str(DEVICES_PER_PROCESS),
       "--processes", str(NUM_PROCESSES), config, workdir,
       "--config.mesh.shape=(2,4,1)", f"--config.data.data_dir={tfds_dir}", *flags],
      cwd=ROOT, env=_environment(cache_dir), capture_output=True, text=True,
      timeout=600)
  output = result.stdout + result.stderr
  assert result.returncode == 0, output[-4000:]
  log_path = re.search(r"process 1 of 2: log in (\S+)", output).group(1)
  with open(log_path) as f:
    return output, f.read()


_CLIP_FLAGS = ("--config.mesh.shape=(2,4,1)", "--config.log_every=1",
               "--config.eval_every=100000", "--config.checkpoint_every=100000")


def _saved_steps(workdir):
  return sorted(int(d) for d in os.listdir(checkpoint_dir(workdir)) if d.isdigit())


@pytest.fixture(scope="module")
def clip_run(tmp_path_factory, tfds_dir, cache_dir):
  """A tiny CLIP trained by two processes until process 1 gets a SIGTERM (a
  pod's preemption notice), then resumed for two more steps by
  launch/local.sh. A dict of what each launch printed and saved."""
  workdir = str(tmp_path_factory.mktemp("two_process") / "clip")
  processes = _start_processes([
      "-m", "unclip_jax.train", "--config", "configs/clip.py:tiny",
      "--workdir", workdir, f"--config.data.data_dir={tfds_dir}",
      "--config.total_steps=100000", *_CLIP_FLAGS], cache_dir)
  metrics = os.path.join(workdir, "metrics.jsonl")
  deadline = time.monotonic() + 300
  while not (os.path.exists(metrics) and os.path.getsize(metrics)):
    assert time.monotonic() < deadline and processes[0].poll() is None
    time.sleep(0.5)
  processes[1].send_signal(signal.SIGTERM)
  preempted = _finish(processes, expected_status=128 + signal.SIGTERM)
  stopped = int(re.search(r"preempted at step (\d+) of 100000",
                          preempted[0]).group(1))
  saved_then = _saved_steps(workdir)
  resumed = _launch("configs/clip.py:tiny", workdir, tfds_dir, cache_dir,
                    f"--config.total_steps={stopped + 2}", *_CLIP_FLAGS[1:])
  return {"workdir": workdir, "preempted": preempted, "stopped": stopped,
          "saved_then": saved_then, "resumed": resumed}


def test_sigterm_to_one_process_saves_and_stops_both_at_the_same_step(clip_run):
  stopped = clip_run["stopped"]
  assert f"preempted at step {stopped} of 100000" in clip_run["preempted"][1]
  assert clip_run["saved_then"] == [stopped]


def test_only_process_0_logs_and_writes_metrics(clip_run):
  stopped, (first, _), (output, log) = (
      clip_run["stopped"], clip_run["preempted"], clip_run["resumed"])
  assert "process 0 of 2" in first and "step 1/100000" in first
  assert f"resumed from step {stopped}" in output
  assert f"step {stopped + 2}/{stopped + 2}" in output
  for other in clip_run["preempted"][1], log:  # process 1: warnings only
    assert not re.search(r"step \d+/", other) and "eval at step" not in other
  with open(os.path.join(clip_run["workdir"], "metrics.jsonl")) as f:
    records = [json.loads(line) for line in f]
  assert [r["step"] for r in records if "train/loss" in r] == list(
      range(1, stopped + 3))  # each step once
  assert [r["step"] for r in records if "eval/i2t_top1" in r] == [stopped + 2]


def test_every_process_saves_its_shards_and_one_process_restores_them(clip_run):
  # One process restores whole params onto its own 8 devices, at each step.
  workdir, stopped = clip_run["workdir"], clip_run["stopped"]
  assert _saved_steps(workdir) == [stopped, stopped + 2]
  with StageWorkdir(workdir, "clip") as reader:
    restored = [reader.restore_ema_params(step) for step in (stopped, stopped + 2)]
  for params in restored:
    assert jax.device_count() == 8
    for leaf in jax.tree.leaves(params):
      assert np.all(np.isfinite(np.asarray(leaf)))
  changed = jax.tree.map(lambda a, b: not np.array_equal(a, b), *restored)
  assert any(jax.tree.leaves(changed)), "the resumed steps did not train"


def test_decoder_over_two_processes_on_the_two_process_clip(clip_run, tmp_path,
                                                            tfds_dir, cache_dir):
  # Process 0 alone reads the CLIP and builds the embedding caches while process
  # 1 waits; both train, evaluate (the CLIP on each host's own devices inside
  # the trainer's mesh) and sample the grid that process 0 writes.
  workdir = str(tmp_path / "decoder")
  output, _ = _launch("configs/decoder.py:tiny", workdir, tfds_dir, cache_dir,
                      f"--config.clip_workdir={clip_run['workdir']}")
  assert "computing the train embedding cache" in output
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    final = [json.loads(line) for line in f][-1]
  assert final["step"] == 4 and np.isfinite(final["eval/clip_cos"])
  assert os.path.exists(os.path.join(workdir, "samples", "step_4.png"))


def test_a_failing_process_ends_the_local_job_with_its_status(tmp_path, cache_dir):
  result = subprocess.run(
      ["launch/local.sh", "--processes", "2", "configs/clip.py:tiny",
       str(tmp_path / "clip"), "--config.optim.lr=-1"],
      cwd=ROOT, env=_environment(cache_dir), capture_output=True, text=True,
      timeout=300)
  assert result.returncode == 2, result.stderr[-2000:]
  assert "error: optim.lr=-1.0 must be > 0" in result.stderr
