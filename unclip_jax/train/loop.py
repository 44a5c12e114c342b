"""The one trainer loop every stage runs through."""
import logging
import time

import flax.linen as nn
import jax
import ml_collections
import numpy as np

from unclip_jax import stages
from unclip_jax.checkpoints import manager as checkpoint
from unclip_jax.errors import Diverged, Preempted
from unclip_jax.parallel import distributed
from unclip_jax.parallel import mesh as mesh_lib
from unclip_jax.train import config_checks, peak, progress
from unclip_jax.train import setup as setup_lib
from unclip_jax.train import state as state_lib
from unclip_jax.train import step as step_lib
from unclip_jax.train.metrics import MetricWriter

log = logging.getLogger(__name__)


def _mean_metrics(fetched: list[dict]) -> dict[str, float]:
  """Means over the host copies of a log window's per-step metrics."""
  return {k: float(np.mean([m[k] for m in fetched])) for k in fetched[0]}


def _stop(error: Exception, manager, writer: MetricWriter) -> None:
  """Raises `error` once an async save in flight has finished: the checkpoints
  already written stay whole for the resume the message suggests."""
  manager.wait_until_finished()
  manager.close()
  writer.close()
  raise error


def train(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
  """Trains `config.stage` in `workdir`, resuming from its latest checkpoint.

  Returns the last evaluation metrics.
  """
  distributed.initialize(config)  # before anything touches a device
  stage = stages.get_stage(config.stage)(config, workdir)
  config_checks.check_common(config)
  stage.validate()
  config_checks.prepare_workdir(config, workdir)
  mesh = mesh_lib.make_mesh(config.mesh.shape, config.mesh.dcn_shape)
  stage.prepare()

  init_rng, train_rng = jax.random.split(jax.random.key(config.seed))
  manager = checkpoint.make_manager(workdir, config)
  latest = checkpoint.newest_whole_step(manager)
  if latest is not None and latest >= config.total_steps:
    log.info("already trained to step %d; raise --config.total_steps to "
             "train longer", latest)
    manager.close()
    return {}
  run = setup_lib.setup(config, stage, mesh)
  config_checks.check_disk_space(workdir, run.abstract_state)
  iterator = stage.train_iterator()
  # Newest first: a damaged checkpoint is moved aside, one log line each.
  latest, train_state = checkpoint.restore_newest(manager, run.abstract_state,
                                                  iterator)
  if latest is None:
    train_state = run.init_state(init_rng)
  else:
    log.info("resumed from step %d in %s", latest, workdir)

  first = next(iterator)
  setup_lib.check_batch(first, run.abstract_batch, jax.process_count())
  meter = progress.Progress(
      total_steps=config.total_steps, batch_size=config.batch_size,
      flops_per_step_per_device=run.flops_per_step / mesh.size,
      peak_flops=peak.peak_flops_per_device(config.get("peak_flops"), config.dtype))

  writer = MetricWriter(workdir)
  step = int(jax.device_get(train_state.step))
  history, eval_metrics, batch = [], {}, first
  skip_streak = 0  # consecutive skipped (non-finite) steps, seen at log time
  meter.start(step)
  while step < config.total_steps:
    train_state, metrics = run.step(train_state, run.global_batch(batch), train_rng)
    history.append(metrics)
    step += 1
    last = step == config.total_steps
    if step % config.log_every == 0 or last:
      fetched = jax.device_get(history)  # the only host sync between logs
      summary = _mean_metrics(fetched)
      history = []
      summary.update(meter.measure(step))
      log.info(meter.line(step, summary["train/loss"], summary))
      writer.write(step, summary)
      try:
        skip_streak = step_lib.count_skips(
            skip_streak, [m["train/skipped"] for m in fetched],
            first_step=step - len(fetched) + 1,
            limit=config.get("max_consecutive_skips", 0))
      except Diverged as e:
        _stop(e, manager, writer)
    if step % config.eval_every == 0 or last:
      began = time.perf_counter()
      with jax.set_mesh(mesh), nn.logical_axis_rules(run.rules):
        eval_metrics = stage.evaluate(train_state.ema_params, step)
        stage.write_samples(train_state.ema_params, step)
      writer.write(step, eval_metrics)
      if eval_metrics:
        log.info("eval at step %d: %s", step, ", ".join(
            f"{k} {v:.4f}" for k, v in sorted(eval_metrics.items())))
      meter.exclude(time.perf_counter() - began)
    # Under jax.distributed a SIGTERM (a pod's preemption notice) is not fatal:
    # every process learns of it and they agree on a step to save at and stop.
    preempted = manager.reached_preemption(step)
    if step % config.checkpoint_every == 0 or last or preempted:
      began = time.perf_counter()
      # One reduction and one scalar fetched per save: a state with a NaN or inf
      # is never written over the good checkpoints.
      if not state_lib.all_finite(train_state):
        error = Diverged(
            f"refusing to save checkpoint {step}: the train state holds NaN or "
            "inf values (an update overflowed); lower --config.optim.lr, check "
            "the data, or resume from an earlier checkpoint (the ones in "
            f"{checkpoint.checkpoint_dir(workdir)} are untouched)")
        _stop(error, manager, writer)
      checkpoint.save(manager, step, train_state, iterator, config,
                      force=last or preempted)
      meter.exclude(time.perf_counter() - began)
    if preempted:
      break
    if not last:
      batch = next(iterator)
  manager.wait_until_finished()
  manager.close()
  writer.close()
  if step < config.total_steps:
    raise Preempted(f"preempted at step {step} of {config.total_steps}; saved a "
                    "checkpoint there, and the same command resumes from it")
  return eval_metrics
