"""Rematerialisation policies by name, shared by the transformers and UNets.

"none" keeps every activation for the backward pass; "full" keeps only each
block's inputs and recomputes the rest; "dots" also keeps the outputs of the
weight matmuls (no batch dimensions), recomputing the cheap element-wise work.
"""
import flax.linen as nn
import jax

REMAT_POLICIES = ("none", "full", "dots")


def policy_name(remat: bool | str) -> str:
  """A config's remat value (a policy name, or a bool: True = "full")."""
  if isinstance(remat, bool):
    return "full" if remat else "none"
  if remat not in REMAT_POLICIES:
    raise ValueError(f"remat_policy {remat!r}: use one of {REMAT_POLICIES}")
  return remat


def remat(module_cls, policy: bool | str, **kwargs):
  """`module_cls` under nn.remat with the named policy (itself for "none").

  kwargs go to nn.remat (e.g. static_argnums, prevent_cse=False inside scan).
  """
  name = policy_name(policy)
  if name == "none":
    return module_cls
  saveable = (jax.checkpoint_policies.dots_with_no_batch_dims_saveable
              if name == "dots" else None)
  return nn.remat(module_cls, policy=saveable, **kwargs)
