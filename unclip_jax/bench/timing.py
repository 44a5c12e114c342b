"""Timing repeated calls, and batches made up from a stage's abstract batch."""
import statistics
import time
from typing import Any, Callable

import jax
import numpy as np

from unclip_jax.train import peak


def time_calls(fn: Callable[[], Any], *, repeats: int, warmup: int = 1
               ) -> dict[str, float]:
  """Seconds per call of fn (its result waited for): median, min and max of
  `repeats` calls after `warmup` untimed ones."""
  for _ in range(warmup):
    jax.block_until_ready(fn())
  seconds = []
  for _ in range(repeats):
    began = time.perf_counter()
    jax.block_until_ready(fn())
    seconds.append(time.perf_counter() - began)
  return {"median": statistics.median(seconds), "min": min(seconds),
          "max": max(seconds)}


def ceilings() -> dict[str, float]:
  """This process's matmul rates in GFLOP/s, one per kind (peak.MATMUL_KINDS)."""
  return {f"ceiling_gflops_{kind}": peak.matmul_ceiling(kind) / 1e9
          for kind in peak.MATMUL_KINDS}


def mfu_against(flops_per_second: float, dtype: str) -> dict[str, float]:
  """MFU against the chip's datasheet peak, or on a CPU against the ceiling
  measured here for the compute dtype."""
  datasheet = peak.datasheet_peak()
  if datasheet:
    return {"mfu": flops_per_second / datasheet, "mfu_against": "datasheet"}
  return {"mfu": flops_per_second / peak.peak_flops_per_device(dtype=dtype),
          "mfu_against": f"measured {dtype} ceiling"}


def synthetic_batch(abstract: dict[str, jax.ShapeDtypeStruct], *,
                    vocab_size: int = 256, seed: int = 0) -> dict[str, np.ndarray]:
  """Plausible numpy data shaped like `abstract`: images in [-1, 1], unit
  embeddings, tokens ending in an end token then padding, prefix masks."""
  rng = np.random.default_rng(seed)
  batch = {}
  for name, struct in abstract.items():
    shape = struct.shape
    if struct.dtype == np.bool_:  # a mask over tokens: a prefix of each row
      value = np.arange(shape[1])[None] < rng.integers(1, shape[1] + 1,
                                                       (shape[0], 1))
    elif np.issubdtype(struct.dtype, np.integer):  # tokens
      value = rng.integers(3, vocab_size, shape)
      value[:, shape[1] // 2] = 2
      value[:, shape[1] // 2 + 1:] = 0
    elif len(shape) == 4:  # images
      value = rng.uniform(-1, 1, shape)
    else:  # embeddings and encodings
      value = rng.normal(size=shape)
      if len(shape) == 2:
        value /= np.linalg.norm(value, axis=-1, keepdims=True)
    batch[name] = np.asarray(value).astype(struct.dtype)
  return batch
