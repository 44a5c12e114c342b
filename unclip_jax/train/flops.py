"""Matmul and convolution FLOPs of a function, counted from its jaxpr.

XLA's cost analysis counts the body of a loop once, so a transformer whose
blocks run under `nn.scan` (or a step that scans over microbatches) reports a
fraction of its work. Counting on the jaxpr multiplies scan bodies by their
length and includes what rematerialisation recomputes. Only dot_general and
convolutions are counted (the usual definition for MFU); element-wise work is
left out.
"""
import math
from typing import Any, Callable

import jax
from jax.extend import core


def _dot_flops(eqn) -> float:
  lhs, rhs = (v.aval.shape for v in eqn.invars[:2])
  (_, rhs_contract), (_, rhs_batch) = eqn.params["dimension_numbers"]
  rhs_free = [d for i, d in enumerate(rhs)
              if i not in rhs_contract and i not in rhs_batch]
  return 2.0 * math.prod(lhs) * math.prod(rhs_free)


def _conv_flops(eqn) -> float:
  rhs = eqn.invars[1].aval.shape
  out = eqn.outvars[0].aval.shape
  out_feature_dim = eqn.params["dimension_numbers"].rhs_spec[0]
  # Each output element: one multiply-add per kernel element of its group.
  per_output = math.prod(rhs) / rhs[out_feature_dim]
  return 2.0 * math.prod(out) * per_output / eqn.params.get(
      "batch_group_count", 1)


def _sub_jaxprs(value) -> list:
  if isinstance(value, core.ClosedJaxpr):
    return [value.jaxpr]
  if isinstance(value, core.Jaxpr):
    return [value]
  if isinstance(value, (tuple, list)):
    return [j for v in value for j in _sub_jaxprs(v)]
  return []


def jaxpr_flops(jaxpr) -> float:
  """FLOPs of one run of `jaxpr` (a Jaxpr or ClosedJaxpr)."""
  jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
  total = 0.0
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    if name == "dot_general":
      total += _dot_flops(eqn)
    elif name == "conv_general_dilated":
      total += _conv_flops(eqn)
    elif name == "cond":  # one branch runs: count the costliest
      total += max(jaxpr_flops(b) for b in eqn.params["branches"])
    else:
      inner = sum(jaxpr_flops(j) for value in eqn.params.values()
                  for j in _sub_jaxprs(value))
      total += inner * eqn.params.get("length", 1) if name == "scan" else inner
  return total


def count_flops(fn: Callable, *args: Any) -> float:
  """FLOPs of `fn(*args)` (arrays or ShapeDtypeStructs), traced not run."""
  return jaxpr_flops(jax.make_jaxpr(fn)(*args))
