"""FLOPs counted on the jaxpr: scanned bodies times their length (XLA's cost
analysis counts them once), backward passes and rematerialisation included."""
import flax.linen as nn
import jax
import jax.numpy as jnp

from unclip_jax.train.flops import count_flops


def _scanned_matmuls(w, x):
  def body(carry, _):
    return jnp.tanh(carry @ w), None
  return jax.lax.scan(body, x, None, length=5)[0].sum()


def test_scan_bodies_count_once_per_iteration():
  w, x = jnp.ones((64, 64)), jnp.ones((32, 64))
  one_matmul = 2 * 32 * 64 * 64
  assert count_flops(_scanned_matmuls, w, x) == 5 * one_matmul
  # Backward: two matmuls per step; remat adds the forward again.
  assert count_flops(jax.grad(_scanned_matmuls), w, x) == 15 * one_matmul
  assert count_flops(jax.grad(jax.checkpoint(_scanned_matmuls)), w,
                     x) == 20 * one_matmul


def test_convolutions_forward_and_backward():
  features = 64
  x = jnp.ones((8, 16, 16, 32))
  conv = nn.Conv(features, (3, 3), padding="SAME")
  params = conv.init(jax.random.key(0), x)
  forward = 2 * 8 * 16 * 16 * features * 3 * 3 * 32
  loss = lambda p, x: conv.apply(p, x).sum()
  assert count_flops(loss, params, x) == forward
  assert count_flops(jax.grad(loss, argnums=(0, 1)), params, x) == 3 * forward
