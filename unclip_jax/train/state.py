"""Train state as plain data, created directly sharded on the mesh."""
from typing import Any, Callable

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from unclip_jax.parallel import partitioning


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # int32 scalar
  params: Any
  opt_state: Any
  ema_params: Any  # the params every later stage and sampler uses


def new_state(params, tx: optax.GradientTransformation) -> TrainState:
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    opt_state=tx.init(params),
                    ema_params=jax.tree.map(jnp.copy, params))


def sharded_init(init_params: Callable[[jax.Array], Any],
                 tx: optax.GradientTransformation, mesh: Mesh, rules,
                 rng: jax.Array) -> tuple[TrainState, Any]:
  """Initialises the state already sharded; returns (state, its shardings).

  `init_params(rng)` returns params boxed with logical axis names. The state's
  shardings come from `jax.eval_shape`, so nothing is allocated unsharded.
  """
  def boxed_state(rng):
    return new_state(init_params(rng), tx)

  # Traced without active rules on purpose: flax's DenseGeneral reshapes its
  # boxed kernel during init, which a rank-mismatched constraint would break.
  # The out_shardings alone place every leaf.
  with jax.set_mesh(mesh):
    abstract = jax.eval_shape(boxed_state, rng)
    shardings = partitioning.logical_shardings(abstract, mesh, rules)
    state = jax.jit(lambda r: nn.unbox(boxed_state(r)),
                    out_shardings=shardings)(rng)
  return state, shardings


def abstract_state(init_params, tx, mesh: Mesh, rules, rng):
  """ShapeDtypeStructs with shardings: the target for restoring a checkpoint."""
  def boxed_state(rng):
    return new_state(init_params(rng), tx)

  with jax.set_mesh(mesh):
    abstract = jax.eval_shape(boxed_state, rng)
    shardings = partitioning.logical_shardings(abstract, mesh, rules)
  return jax.tree.map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
      nn.unbox(abstract), shardings), shardings


@jax.jit
def all_finite(tree: Any) -> jax.Array:
  """True when no float leaf of `tree` holds a NaN or inf: one reduction on
  the devices, one scalar to fetch."""
  checks = [jnp.isfinite(x).all() for x in jax.tree.leaves(tree)
            if jnp.issubdtype(x.dtype, jnp.inexact)]
  return jnp.stack(checks).all() if checks else jnp.asarray(True)


def ema_update(ema, params, step, decay: float):
  """EMA with a warm-up ((1+step)/(10+step)) so short runs are not all init."""
  if not decay:
    return params
  d = jnp.minimum(decay, (1.0 + step) / (10.0 + step))
  return jax.tree.map(lambda e, p: d * e + (1.0 - d) * p, ema, params)
