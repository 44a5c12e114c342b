"""TransformerStack: scan == loop, masks, remat, dropout, bf16."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from unclip_jax.models import transformer
from unclip_jax.models.transformer import TransformerStack

BATCH, LENGTH, WIDTH, DEPTH, HEADS = 2, 6, 16, 2, 4


def _inputs():
  x = jnp.asarray(np.random.default_rng(0).normal(size=(BATCH, LENGTH, WIDTH)),
                  jnp.float32)
  valid = jnp.array([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]], bool)
  return x, valid


def _stack(**kwargs):
  return TransformerStack(WIDTH, DEPTH, HEADS, **kwargs)


def _apply(**kwargs):
  """A jitted apply (eager `nn.scan` recompiles on every call)."""
  return jax.jit(_stack(**kwargs).apply, static_argnames="deterministic")


def _key(seed):
  # unsafe_rbg: init compiles in a fraction of threefry's time on CPU.
  return jax.random.key(seed, impl="unsafe_rbg")


@pytest.fixture(scope="module")
def causal_params():
  x, valid = _inputs()
  return jax.jit(_stack(causal=True).init)(_key(1), x, valid)


def test_scan_and_loop_agree_for_every_remat_policy(causal_params):
  x, valid = _inputs()
  expected = _apply(causal=True)(causal_params, x, valid)
  boxes = jax.tree.leaves(causal_params,
                          is_leaf=lambda v: isinstance(v, nn.Partitioned))
  assert all(b.names[0] == "layers" for b in boxes)
  assert all(b.value.shape[0] == DEPTH for b in boxes)
  loop_params = transformer.unscan_params(nn.unbox(causal_params))
  assert sorted(loop_params["params"]) == [f"blocks_{i}" for i in range(DEPTH)]
  looped = _apply(causal=True, scan_layers=False)(loop_params, x, valid)
  np.testing.assert_allclose(looped, expected, atol=1e-5)
  looped = _apply(causal=True, scan_layers=False, remat_policy="full")(
      loop_params, x, valid)
  np.testing.assert_allclose(looped, expected, atol=1e-5)
  # Remat changes what the backward pass stores, never the values.
  def loss(params, policy):
    return _stack(causal=True, remat_policy=policy).apply(params, x,
                                                          valid).sum()
  both = jax.jit(lambda p: (jax.grad(loss)(p, "dots"),
                            jax.grad(loss)(p, "none")))(causal_params)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5),
               *nn.unbox(both))


def test_causal_stack_ignores_the_future(causal_params):
  x, _ = _inputs()
  apply = _apply(causal=True)
  base = apply(causal_params, x)
  for k in range(LENGTH - 1):
    perturbed = x.at[:, k + 1:].add(1.0)
    out = apply(causal_params, perturbed)
    np.testing.assert_array_equal(out[:, :k + 1], base[:, :k + 1])
    assert np.abs(out[:, k + 1:] - base[:, k + 1:]).max() > 1e-3


def test_padded_keys_do_not_change_real_positions(causal_params):
  x, valid = _inputs()
  apply = _apply(causal=False)  # bidirectional: padding is the only mask
  base = apply(causal_params, x, valid)
  noise = 5.0 * np.random.default_rng(2).normal(size=x.shape)
  perturbed = jnp.where(valid[..., None], x, noise)
  out = apply(causal_params, perturbed, valid)
  np.testing.assert_allclose(out[0, :4], base[0, :4], atol=1e-6)
  np.testing.assert_allclose(out[1], base[1], atol=1e-6)
  assert np.isfinite(out).all()


def test_full_mask_equals_built_mask(causal_params):
  x, valid = _inputs()
  apply = _apply(causal=True)
  full = transformer.make_attention_mask(valid, causal=True)
  assert full.shape == (BATCH, 1, LENGTH, LENGTH)
  per_head = jnp.broadcast_to(full, (BATCH, HEADS, LENGTH, LENGTH))
  np.testing.assert_allclose(apply(causal_params, x, per_head),
                             apply(causal_params, x, valid), atol=1e-6)


def test_dropout_only_when_not_deterministic(causal_params):
  x, _ = _inputs()
  apply = _apply(dropout=0.5)
  base = apply(causal_params, x)
  dropped = [apply(causal_params, x, deterministic=False,
                   rngs={"dropout": jax.random.key(s)}) for s in (0, 0, 1)]
  np.testing.assert_array_equal(dropped[0], dropped[1])
  assert np.abs(dropped[0] - base).max() > 1e-3
  assert np.abs(dropped[0] - dropped[2]).max() > 1e-3


def test_bfloat16_close_to_float32(causal_params):
  x, valid = _inputs()
  expected = _apply(causal=True)(causal_params, x, valid)
  out = _apply(causal=True, dtype=jnp.bfloat16)(causal_params, x, valid)
  assert out.dtype == jnp.bfloat16
  out = np.asarray(out, np.float32)
  assert np.linalg.norm(out - expected) / np.linalg.norm(expected) < 0.03


def test_bad_remat_policy_is_refused():
  x, _ = _inputs()
  with pytest.raises(ValueError, match="remat_policy"):
    _stack(remat_policy="some").init(jax.random.key(0), x)
