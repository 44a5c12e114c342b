"""precision.py: compute dtypes by name; products accumulated in float32 whose
gradients are jax's in float32 and bf16 x bf16 products on accelerators."""
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from unclip_jax.models import precision
from unclip_jax.models.precision import DTYPES, dtype_named

# (spec, lhs shape, rhs shape): every product form the models use.
PRODUCTS = [("blhd,bmhd->bhlm", (2, 5, 3, 4), (2, 6, 3, 4)),   # attention logits
            ("bhlm,bmhd->blhd", (2, 3, 5, 6), (2, 6, 3, 4)),   # weighted values
            ("blc,cnhd->nblhd", (2, 5, 8), (8, 3, 2, 4)),      # fused qkv
            ("blhd,hde->ble", (2, 5, 2, 4), (2, 4, 8)),        # merged heads
            ("be,eto->bto", (2, 8), (8, 2, 6)),                # scale/shift
            ("...c,co->...o", (2, 3, 4, 8), (8, 6))]           # Dense, any rank


def test_dtype_named_knows_the_table_and_refuses_in_one_line():
  assert dtype_named("bfloat16") is jnp.bfloat16
  assert dtype_named("float32") is jnp.float32
  assert set(DTYPES) == {"bfloat16", "float32"}
  for bad in ("fp16", "", None):
    with pytest.raises(ValueError) as error:
      dtype_named(bad)
    assert str(error.value) == (f"dtype={bad!r}: use one of "
                                "['bfloat16', 'float32']")


def _operands(lhs_shape, rhs_shape, dtype=jnp.float32):
  keys = jax.random.split(jax.random.key(0))
  return (jax.random.normal(keys[0], lhs_shape).astype(dtype),
          jax.random.normal(keys[1], rhs_shape).astype(dtype))


@pytest.mark.parametrize("spec,lhs_shape,rhs_shape", PRODUCTS)
def test_einsum_and_its_gradients_are_jnp_einsums_in_float32(spec, lhs_shape,
                                                             rhs_shape):
  lhs, rhs = _operands(lhs_shape, rhs_shape)
  ours = lambda a, b: jnp.sin(precision.einsum(spec, a, b)).sum()
  jax_own = lambda a, b: jnp.sin(jnp.einsum(spec, a, b)).sum()
  for got, want in zip(jax.grad(ours, (0, 1))(lhs, rhs),
                       jax.grad(jax_own, (0, 1))(lhs, rhs)):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  assert precision.einsum(spec, lhs.astype(jnp.bfloat16),
                          rhs.astype(jnp.bfloat16)).dtype == jnp.float32


def test_dense_with_our_dot_general_is_flax_dense():
  x = _operands((3, 4, 8), (1,))[0]
  ours = nn.Dense(5, dot_general=precision.dot_general_f32_accumulate)
  params = nn.Dense(5).init(jax.random.key(1), x)
  loss = lambda module: lambda p: jnp.sin(module.apply(p, x)).sum()
  np.testing.assert_allclose(ours.apply(params, x), nn.Dense(5).apply(params, x),
                             rtol=1e-6)
  got, want = (jax.grad(loss(m))(params) for m in (ours, nn.Dense(5)))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5), got, want)


def _dot_operand_types(fn, args, platform: str) -> list[str]:
  text = fn.trace(*args).lower(lowering_platforms=(platform,)).as_text()
  return re.findall(r"stablehlo\.dot_general .*?: \(tensor<[^>]*x(\w+)>, "
                    r"tensor<[^>]*x(\w+)>\)", text)


@pytest.mark.parametrize("spec,lhs_shape,rhs_shape", PRODUCTS[:3:2])
def test_bfloat16_gradients_are_bf16_products_except_on_cpu(spec, lhs_shape,
                                                            rhs_shape):
  # jax's own transpose multiplies the f32 cotangent by a bf16 operand: an f32
  # product. Accelerators get bf16 x bf16; XLA:CPU cannot run every such order.
  args = _operands(lhs_shape, rhs_shape, jnp.bfloat16)
  grads = jax.jit(jax.grad(lambda a, b: precision.einsum(spec, a, b).astype(
      jnp.bfloat16).astype(jnp.float32).sum(), (0, 1)))
  for platform in ("tpu", "cuda"):
    types = _dot_operand_types(grads, args, platform)
    assert types and all(t == ("bf16", "bf16") for t in types), (platform, types)
  assert ("f32", "f32") in _dot_operand_types(grads, args, "cpu")
  for grad, arg in zip(grads(*args), args):  # and CPU runs it
    assert grad.dtype == jnp.bfloat16 and grad.shape == arg.shape
