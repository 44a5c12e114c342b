"""The XLA compiler options the library's jitted model functions compile with.

One set per platform, passed as `jax.jit(..., compiler_options=...)` to the train
step, the samplers, inversion and evaluation: no process-wide XLA_FLAGS to set
before jax starts, nothing changed for the user's own functions, and a TPU program
compiled ahead of time on a CPU host gets the TPU's options.

CPU: XLA (jaxlib 0.10) hands matmuls, reductions and convolutions to YNNPACK by
default. Its 3x3 convolutions are the slow ones at the UNet's sizes: on the 2-core
AMD EPYC development machine (f32 matmul ceiling ~205 GFLOP/s), a 3x3 convolution at
64 x 64 px, 64 channels, batch 8 ran at ~102 GFLOP/s forward and ~93 with its
gradients through YNNPACK, ~172 and ~126 through XLA's own convolution (PyTorch's
oneDNN: ~218 / ~186). So convolutions are taken out of YNNPACK's list, matmuls and
reductions left in it: the decoder's train step ran 1.18x faster, its sampler 1.32x
(docs/performance.md, `python -m unclip_jax.bench convolutions`). A user's
XLA_FLAGS naming the same option win.
"""
import functools
import logging
import os
from typing import Any, Callable

import jax
import jax.numpy as jnp

# The default YNNPACK list of jaxlib 0.10 (individual dots and convolutions,
# reductions) without convolutions. The value is a comma-separated enum list.
YNN_FUSION_TYPES = "xla_cpu_experimental_ynn_fusion_type"
CPU_OPTIONS = {YNN_FUSION_TYPES: "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,"
                                 "LIBRARY_FUSION_TYPE_REDUCE"}


def compiler_options(platform: str | None = None) -> dict[str, str]:
  """The options to compile for `platform` ('cpu', 'gpu', 'tpu'; default: jax's
  default backend). Empty where there is nothing to change, where the user's
  XLA_FLAGS set the option themselves, or where this XLA does not know it."""
  platform = platform or jax.default_backend()
  if platform != "cpu" or YNN_FUSION_TYPES in os.environ.get("XLA_FLAGS", ""):
    return {}
  return dict(CPU_OPTIONS) if _cpu_accepts_options() else {}


@functools.cache
def _cpu_accepts_options() -> bool:
  """Whether this jaxlib's CPU compiler knows CPU_OPTIONS (an XLA without the
  option refuses to compile with it): checked once per process on a scalar."""
  try:
    jax.jit(lambda x: x + 1, compiler_options=CPU_OPTIONS).lower(
        jnp.float32(0)).compile()
    return True
  except Exception as error:  # XLA's error type differs across jaxlib versions.
    logging.warning("XLA:CPU does not take %s (%s); compiling without it",
                    CPU_OPTIONS, str(error).splitlines()[0])
    return False


# Public in jax 0.10; where a later jax drops it, GPUs and TPUs (no options, one
# jit) are unaffected.
_TRACER = getattr(jax.core, "Tracer", ())


class _Jitted:
  """`jax.jit(fun)` compiled with options where it is called at the top level,
  without them where it is traced into an outer function (jax takes compiler
  options on top-level jits only; the outer one's options then apply)."""

  def __init__(self, fun: Callable, options: dict[str, str], jit_kwargs: dict):
    self._plain = jax.jit(fun, **jit_kwargs)
    self._tuned = (jax.jit(fun, compiler_options=options, **jit_kwargs)
                   if options else self._plain)

  def __call__(self, *args, **kwargs):
    if self._tuned is self._plain:  # no options (GPU, TPU): nothing to choose
      return self._plain(*args, **kwargs)
    # Nested calls (samplers inside the prior's sampler, FLOP counting under
    # make_jaxpr) always pass traced arrays: the params at least.
    traced = any(isinstance(leaf, _TRACER)
                 for leaf in jax.tree.leaves((args, kwargs)))
    return (self._plain if traced else self._tuned)(*args, **kwargs)

  def __getattr__(self, name: str):  # lower, trace, eval_shape, ...
    return getattr(self._tuned, name)


def jit(fun: Callable, *, platform: str | None = None, **jit_kwargs: Any):
  """`jax.jit(fun, **jit_kwargs)` with `compiler_options(platform)`."""
  return _Jitted(fun, compiler_options(platform), jit_kwargs)


def platform_of(sharding: jax.sharding.Sharding) -> str:
  """The platform a sharding's devices are, e.g. a TPU topology's on a CPU host."""
  return next(iter(sharding.device_set)).platform
