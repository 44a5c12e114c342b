"""Compute dtypes by name, and the matmul precision shared by every model.

With a bfloat16 compute dtype, products are accumulated in float32
(`preferred_element_type`): more accurate, and on CPUs with bf16 matrix units
about 4x faster than a bf16 -> bf16 dot (which XLA:CPU does not vectorise).

The backward pass matters as much: jax's own transpose of such a product
multiplies the float32 cotangent by a bfloat16 operand, which XLA computes as a
float32 product, for two thirds of a train step's matmul FLOPs. `einsum` and
`dot_general_f32_accumulate` round the cotangent to the operands' dtype first on
GPUs and TPUs, so the backward products are bf16 x bf16 -> f32 as well (what
mixed-precision training does on accelerators); on CPUs they keep jax's products
(`_einsum_backward` says why). With float32 operands nothing changes.
"""
import functools
import string

import jax
import jax.numpy as jnp

# A config's `dtype` string -> the compute dtype. Parameters stay float32.
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def dtype_named(name: str):
  """The compute dtype called `name` in a config; one-line error otherwise."""
  if not isinstance(name, str) or name not in DTYPES:
    raise ValueError(f"dtype={name!r}: use one of {sorted(DTYPES)}")
  return DTYPES[name]


def _accumulate(spec: str, lhs: jax.Array, rhs: jax.Array) -> jax.Array:
  return jnp.einsum(spec, lhs, rhs, preferred_element_type=jnp.float32)


def _explicit(spec: str, *operands: jax.Array) -> str:
  """`spec` with its '...' written out as letters it does not use."""
  if "..." not in spec:
    return spec
  inputs, out = spec.split("->")
  terms = inputs.split(",")
  term, operand = next((t, o) for t, o in zip(terms, operands) if "..." in t)
  spare = [c for c in string.ascii_uppercase if c not in spec]
  letters = "".join(spare[:operand.ndim - (len(term) - 3)])
  return f"{','.join(terms)}->{out}".replace("...", letters)


def einsum(spec: str, lhs: jax.Array, rhs: jax.Array) -> jax.Array:
  """`jnp.einsum(spec, lhs, rhs)` of two operands in float32 out, accumulated in
  float32, its gradients' products in the operands' dtype on accelerators
  (module docstring).

  Every index must appear in two of lhs, rhs and the output (a matmul, with or
  without batch indices), as 'blc,cnhd->nblhd'; a leading '...' is the same
  in lhs and output, as '...c,co->...o'.
  """
  return _einsum(_explicit(spec, lhs, rhs), lhs, rhs)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _einsum(spec: str, lhs: jax.Array, rhs: jax.Array) -> jax.Array:
  return _accumulate(spec, lhs, rhs)


def _einsum_forward(spec, lhs, rhs):
  return _accumulate(spec, lhs, rhs), (lhs, rhs)


def _einsum_backward(spec, residuals, cotangent):
  lhs, rhs = residuals
  inputs, out = spec.split("->")
  lhs_spec, rhs_spec = inputs.split(",")

  def jax_own(cotangent):  # jax's transposes of the product, nothing recomputed
    by_lhs = jax.linear_transpose(lambda x: _accumulate(spec, x, rhs), lhs)
    by_rhs = jax.linear_transpose(lambda y: _accumulate(spec, lhs, y), rhs)
    return by_lhs(cotangent)[0], by_rhs(cotangent)[0]

  def in_operand_dtype(cotangent):
    cotangent = cotangent.astype(jnp.result_type(lhs, rhs))
    lhs_grad = _accumulate(f"{out},{rhs_spec}->{lhs_spec}", cotangent, rhs)
    rhs_grad = _accumulate(f"{lhs_spec},{out}->{rhs_spec}", lhs, cotangent)
    return lhs_grad.astype(lhs.dtype), rhs_grad.astype(rhs.dtype)

  # XLA:CPU (jaxlib 0.10) runs bf16 x bf16 -> f32 products only through YNNPACK,
  # which takes some dimension orders and not others; the rest fail at run time
  # ("Unsupported element type for DotThunk::Execute: BF16 x BF16 = F32", e.g.
  # attention's key gradient 'blhd,bhlm->bmhd'). So CPUs keep jax's gradient.
  return jax.lax.platform_dependent(cotangent, cpu=jax_own,
                                    default=in_operand_dtype)


_einsum.defvjp(_einsum_forward, _einsum_backward)


def dot_general_f32_accumulate(lhs: jax.Array, rhs: jax.Array, dimension_numbers,
                               precision=None, preferred_element_type=None,
                               **unused) -> jax.Array:
  """`lax.dot_general` as `einsum` computes it. Pass as `dot_general=` to
  nn.Dense / nn.DenseGeneral (they give no batch dimensions, and no precision)."""
  del precision, preferred_element_type, unused
  (lhs_contract, rhs_contract), (lhs_batch, rhs_batch) = dimension_numbers
  letters = iter(string.ascii_letters)
  lhs_idx = [next(letters) for _ in range(lhs.ndim)]
  rhs_idx = [next(letters) for _ in range(rhs.ndim)]
  for left, right in zip(tuple(lhs_contract) + tuple(lhs_batch),
                         tuple(rhs_contract) + tuple(rhs_batch)):
    rhs_idx[right] = lhs_idx[left]
  # dot_general's output order: batch, then lhs's free, then rhs's free axes.
  out = ([lhs_idx[d] for d in lhs_batch]
         + [i for d, i in enumerate(lhs_idx) if d not in (*lhs_contract, *lhs_batch)]
         + [i for d, i in enumerate(rhs_idx) if d not in (*rhs_contract, *rhs_batch)])
  return einsum(f"{''.join(lhs_idx)},{''.join(rhs_idx)}->{''.join(out)}", lhs, rhs)
