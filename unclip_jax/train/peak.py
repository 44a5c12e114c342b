"""What MFU is measured against: a chip's datasheet peak, or on a CPU the matmul
rate measured in this process (CPUs differ from machine to machine and day to
day; a figure assumed for one overstates or understates MFU on the next).
"""
import functools
import time

import jax
import jax.numpy as jnp

# Peak dense bf16 FLOP/s per device by device kind (datasheets).
PEAK_FLOPS = {
    "TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12,
    "TPU v5": 459e12, "TPU v5p": 459e12, "TPU v6 lite": 918e12,
    "NVIDIA H100": 989e12, "NVIDIA H200": 989e12, "NVIDIA A100": 312e12,
}
# The matmul kinds a CPU ceiling is measured for: operand dtype, result dtype.
MATMUL_KINDS = {
    "float32": (jnp.float32, jnp.float32),
    "bfloat16": (jnp.bfloat16, jnp.float32),  # what our models do in bf16
    "bfloat16_out": (jnp.bfloat16, jnp.bfloat16),  # nn.Dense(dtype=bf16)'s path
}


@functools.cache
def matmul_ceiling(kind: str = "float32", size: int = 2048, repeats: int = 5
                   ) -> float:
  """FLOP/s of a size x size matmul of `kind` (MATMUL_KINDS) on the first
  device: the best of `repeats` timed calls after a warm-up."""
  operand, result = MATMUL_KINDS[kind]
  a = jax.random.normal(jax.random.key(0), (size, size), jnp.float32).astype(operand)
  b = jax.random.normal(jax.random.key(1), (size, size), jnp.float32).astype(operand)
  matmul = jax.jit(lambda a, b: jnp.matmul(a, b, preferred_element_type=result))
  jax.block_until_ready(matmul(a, b))
  best = float("inf")
  for _ in range(repeats):
    began = time.perf_counter()
    jax.block_until_ready(matmul(a, b))
    best = min(best, time.perf_counter() - began)
  return 2.0 * size**3 / best


def datasheet_peak() -> float | None:
  """The first device's datasheet peak, or None (a CPU, an unknown chip)."""
  kind = jax.devices()[0].device_kind
  for name in sorted(PEAK_FLOPS, key=len, reverse=True):
    if kind.startswith(name):
      return PEAK_FLOPS[name]
  return None


def peak_flops_per_device(override: float | None = None,
                          dtype: str = "float32") -> float:
  """FLOP/s MFU divides by: `override`, the chip's datasheet peak, or on a CPU
  the measured matmul ceiling for the compute `dtype` (0.0: unknown)."""
  if override:
    return float(override)
  peak = datasheet_peak()
  if peak:
    return peak
  if jax.devices()[0].platform == "cpu":
    return matmul_ceiling(dtype if dtype in MATMUL_KINDS else "float32")
  return 0.0
