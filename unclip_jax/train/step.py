"""The train step: one jax.jit with explicit shardings and donated state."""
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from unclip_jax.train.state import TrainState, ema_update

LossFn = Callable[[Any, Any, jax.Array], tuple[jax.Array, dict]]


def train_step(state: TrainState, batch: Any, rng: jax.Array, *,
               loss_fn: LossFn, tx: optax.GradientTransformation,
               ema_decay: float) -> tuple[TrainState, dict]:
  """One optimiser step; a non-finite gradient is skipped, not applied."""
  rng = jax.random.fold_in(rng, state.step)
  (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(
      state.params, batch, rng)
  grad_norm = optax.global_norm(grads)
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


def jit_train_step(loss_fn: LossFn, tx: optax.GradientTransformation,
                   ema_decay: float, state_shardings, batch_shardings,
                   replicated) -> Callable:
  step = functools.partial(train_step, loss_fn=loss_fn, tx=tx,
                           ema_decay=ema_decay)
  return jax.jit(step,
                 in_shardings=(state_shardings, batch_shardings, replicated),
                 out_shardings=(state_shardings, replicated),
                 donate_argnums=(0,))
