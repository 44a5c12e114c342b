"""The one softmax attention of every model, and its head projections.

`dot_product_attention` is a pure function; `project_heads` and `merge_heads`
declare their parameters on the calling module (`{name}_kernel`,
`{name}_bias`), so the transformer blocks and the UNet's attention layers share
one parameter layout: fused projections `[embed, n, heads, kv]`, output
`[heads, kv, embed]`. With a bfloat16 compute dtype every matmul takes bf16
operands and accumulates in float32 (see precision.py); logits and softmax are
float32 whatever the dtype.
"""
import math
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from unclip_jax.models import precision
from unclip_jax.parallel.axes import (ACT_BATCH, ACT_HEADS, ACT_LENGTH, EMBED,
                                      HEADS, KV)

Dtype = Any
Initializer = Callable[..., jax.Array]

# Activation axes of q / k / v and of the attended values: [b, l, heads, kv].
HEAD_AXES = (ACT_BATCH, ACT_LENGTH, ACT_HEADS, None)

zeros = nn.initializers.zeros


def fan_in_init(fan_in_axes: Sequence[int]) -> Initializer:
  """Normal init with variance 1 / (product of the `fan_in_axes` dims)."""
  def init(key, shape, dtype=jnp.float32):
    fan_in = math.prod(shape[axis] for axis in fan_in_axes)
    return jax.random.normal(key, shape, dtype) / math.sqrt(fan_in)
  return init


def param(module: nn.Module, name: str, init: Initializer,
          shape: Sequence[int], axes: Sequence[str | None]) -> jax.Array:
  """A float32 parameter boxed with its logical axis names."""
  return module.param(name, nn.with_logical_partitioning(init, tuple(axes)),
                      tuple(shape), jnp.float32)


def dot_product_attention(query: jax.Array, key: jax.Array, value: jax.Array,
                          mask: jax.Array | None = None) -> jax.Array:
  """Softmax attention, softmax(q k^T / sqrt(d)) v.

  Args:
    query: [batch, l, heads, head_dim].
    key, value: [batch, m, heads, head_dim].
    mask: bool, broadcastable to [batch, heads, l, m]; True = may attend.

  Returns:
    [batch, l, heads, head_dim] in `value.dtype`. A fully masked row attends
    uniformly to every key instead of giving NaN.
  """
  logits = precision.einsum("blhd,bmhd->bhlm", query, key)
  # Scaled in float32, after the product: no bf16 rounding of scaled queries.
  logits = logits * (query.shape[-1] ** -0.5)
  if mask is not None:
    # A finite floor, not -inf: an all-pad caption's rows stay finite.
    logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
  weights = jax.nn.softmax(logits, axis=-1).astype(value.dtype)
  return precision.einsum("bhlm,bmhd->blhd", weights, value).astype(value.dtype)


def project_heads(module: nn.Module, x: jax.Array, *, num_outputs: int,
                  num_heads: int, head_dim: int, dtype: Dtype, name: str,
                  kernel_init: Initializer | None = None
                  ) -> tuple[jax.Array, ...]:
  """Fused projection [b, l, c] -> `num_outputs` x [b, l, heads, head_dim].

  Declares `{name}_kernel` [c, num_outputs, heads, head_dim] with axes
  (EMBED, None, HEADS, KV) and `{name}_bias` [num_outputs, heads, head_dim]:
  3 outputs for q, k, v; 2 for the keys and values of a context.
  """
  shape = (num_outputs, num_heads, head_dim)
  kernel = param(module, f"{name}_kernel", kernel_init or fan_in_init([0]),
                 (x.shape[-1],) + shape, (EMBED, None, HEADS, KV))
  bias = param(module, f"{name}_bias", zeros, shape, (None, HEADS, KV))
  y = precision.einsum("blc,cnhd->nblhd", x.astype(dtype), kernel.astype(dtype))
  y = (y + bias[:, None, None]).astype(dtype)
  return tuple(nn.with_logical_constraint(t, HEAD_AXES) for t in y)


def merge_heads(module: nn.Module, x: jax.Array, *, features: int,
                dtype: Dtype, name: str = "out",
                kernel_init: Initializer | None = None) -> jax.Array:
  """[b, l, heads, head_dim] -> [b, l, features].

  Declares `{name}_kernel` [heads, head_dim, features] with axes
  (HEADS, KV, EMBED) and `{name}_bias` [features].
  """
  kernel = param(module, f"{name}_kernel", kernel_init or fan_in_init([0, 1]),
                 x.shape[-2:] + (features,), (HEADS, KV, EMBED))
  bias = param(module, f"{name}_bias", zeros, (features,), (EMBED,))
  y = precision.einsum("blhd,hde->ble", x.astype(dtype), kernel.astype(dtype))
  return (y + bias).astype(dtype)

