"""The train step: one jax.jit with explicit shardings and donated state.

With `grad_accum_steps` > 1 the step scans over microbatches inside the same
jitted program and applies the mean of their gradients once: the update of
the whole batch, with the activations of one microbatch alive at a time.
"""
import functools
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from unclip_jax import xla_options
from unclip_jax.errors import Diverged
from unclip_jax.parallel import partitioning
from unclip_jax.train import flops
from unclip_jax.train.state import TrainState, ema_update

LossFn = Callable[[Any, Any, jax.Array], tuple[jax.Array, dict]]


def split_microbatches(batch: Any, batch_shardings: Any, steps: int) -> Any:
  """[B, ...] -> [steps, B / steps, ...]; microbatch i holds rows i, i + steps,
  i + 2 * steps, ... so every device keeps its own rows (no communication) as
  long as each device's rows divide by `steps`."""
  def split(x, sharding):
    x = x.reshape((x.shape[0] // steps, steps) + x.shape[1:]).swapaxes(0, 1)
    if not isinstance(sharding, NamedSharding):
      return x
    spec = PartitionSpec(None, *sharding.spec)
    return jax.lax.with_sharding_constraint(x, NamedSharding(sharding.mesh,
                                                             spec))
  return jax.tree.map(split, batch, batch_shardings)


def accumulated_value_and_grad(loss_fn: LossFn, params, batch, rng, *,
                               steps: int, batch_shardings=None,
                               param_shardings=None):
  """((mean loss, mean metrics), mean grads) over `steps` microbatches.

  Losses that average over their examples give exactly the whole batch's
  loss and gradient (up to float rounding). Microbatch i draws its randomness
  from fold_in(rng, i).
  """
  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
  if steps == 1:
    return grad_fn(params, batch, rng)
  microbatches = split_microbatches(batch, batch_shardings, steps)

  def as_f32(tree):
    return jax.tree.map(lambda x: x.astype(jnp.float32), tree)

  def one(index, microbatch):
    (loss, metrics), grads = grad_fn(params, microbatch,
                                     jax.random.fold_in(rng, index))
    return as_f32((loss, metrics)), grads

  first = jax.tree.map(lambda x: x[0], microbatches)
  shapes = jax.eval_shape(one, 0, first)
  totals = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
  if param_shardings is not None:  # the running sum lives where params do
    totals = (totals[0], jax.lax.with_sharding_constraint(totals[1],
                                                          param_shardings))

  def body(carry, inputs):
    return jax.tree.map(jnp.add, carry, one(*inputs)), None

  totals, _ = jax.lax.scan(body, totals, (jnp.arange(steps), microbatches))
  return jax.tree.map(lambda x: x / steps, totals)


def train_step(state: TrainState, batch: Any, rng: jax.Array, *,
               loss_fn: LossFn, tx: optax.GradientTransformation,
               ema_decay: float, grad_accum_steps: int = 1,
               batch_shardings=None, param_shardings=None
               ) -> tuple[TrainState, dict]:
  """One optimiser step; a non-finite gradient is skipped, not applied."""
  rng = jax.random.fold_in(rng, state.step)
  (loss, metrics), grads = accumulated_value_and_grad(
      loss_fn, state.params, batch, rng, steps=grad_accum_steps,
      batch_shardings=batch_shardings, param_shardings=param_shardings)
  grad_norm = optax.tree.norm(grads)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  ema = ema_update(state.ema_params, params, state.step, ema_decay)

  finite = jnp.isfinite(grad_norm) & jnp.isfinite(loss)
  keep = functools.partial(jax.tree.map,
                           lambda new, old: jnp.where(finite, new, old))
  new_state = TrainState(step=state.step + 1,
                         params=keep(params, state.params),
                         opt_state=keep(opt_state, state.opt_state),
                         ema_params=keep(ema, state.ema_params))
  metrics = {"train/" + k: v for k, v in metrics.items()}
  metrics.update({"train/loss": loss, "train/grad_norm": grad_norm,
                  "train/skipped": 1.0 - finite.astype(jnp.float32)})
  return new_state, metrics


def count_skips(streak: int, skipped: Sequence[float], *, first_step: int,
                limit: int) -> int:
  """The run of consecutive skipped steps after steps `first_step`,
  `first_step + 1`, ... whose `train/skipped` values are `skipped`, continuing a
  run of `streak` before them. Diverged at the step where it reaches `limit`
  (0: never): a run that only skips makes no progress.

  Read from metrics the loop fetches anyway at log time, so it costs no sync.
  """
  for offset, flag in enumerate(skipped):
    streak = streak + 1 if flag else 0
    if 0 < limit <= streak:
      raise Diverged(
          f"training diverged: the {streak} steps up to step "
          f"{first_step + offset} all had a non-finite loss or gradient norm and "
          "were skipped; lower --config.optim.lr (or raise optim.warmup_steps), "
          "check the data for NaN or inf, or resume from an earlier checkpoint "
          "(move the later ones out of the workdir's checkpoints/); "
          "--config.max_consecutive_skips=0 turns this check off")
  return streak


def jit_train_step(loss_fn: LossFn, tx: optax.GradientTransformation,
                   ema_decay: float, state_shardings, batch_shardings,
                   replicated, grad_accum_steps: int = 1) -> Callable:
  step = functools.partial(
      train_step, loss_fn=loss_fn, tx=tx, ema_decay=ema_decay,
      grad_accum_steps=grad_accum_steps, batch_shardings=batch_shardings,
      param_shardings=state_shardings.params)
  return xla_options.jit(step, platform=xla_options.platform_of(replicated),
                         in_shardings=(state_shardings, batch_shardings, replicated),
                         out_shardings=(state_shardings, replicated),
                         donate_argnums=(0,))


def compile_train_step(loss_fn: LossFn, tx: optax.GradientTransformation,
                       config, mesh: Mesh, rules, state_shardings,
                       batch_shardings, state, batch, rng) -> tuple[Any, float]:
  """The train step traced for these (concrete or abstract) arguments and
  compiled for `mesh`'s devices: what the loop runs and what
  `python -m unclip_jax.compile` measures for a TPU topology.

  Returns (compiled step, matmul + conv FLOPs of one step on all devices,
  counted on its jaxpr: XLA's cost analysis counts a scanned body once).
  """
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    step = jit_train_step(loss_fn, tx, config.optim.ema_decay,
                          state_shardings, batch_shardings,
                          partitioning.replicated(mesh),
                          config.optim.get("grad_accum_steps", 1))
    traced = step.trace(state, batch, rng)
    return traced.lower().compile(), flops.jaxpr_flops(traced.jaxpr)
