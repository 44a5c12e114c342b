"""3x3 convolution rates at the UNet's levels, with this library's compiler
options and with XLA's defaults, in one process (xla_options.py says why)."""
import jax
import jax.numpy as jnp

from unclip_jax import xla_options
from unclip_jax.bench import timing

# (pixels per side, channels): issue #13's decoder levels at 64, 32 and 16 px.
LEVELS = ((64, 64), (32, 128), (16, 192))


def conv3x3(images: jax.Array, kernel: jax.Array) -> jax.Array:
  """A 'SAME' convolution of NHWC images with an HWIO kernel."""
  return jax.lax.conv_general_dilated(images, kernel, (1, 1), "SAME",
                                      dimension_numbers=("NHWC", "HWIO", "NHWC"))


def _with_gradients(images, kernel):
  return jax.grad(lambda x, k: jnp.sum(conv3x3(x, k) ** 2), argnums=(0, 1))(
      images, kernel)


def bench_convolutions(*, batch_size: int, repeats: int,
                       levels=LEVELS) -> dict[str, float]:
  """GFLOP/s of a float32 3x3 'SAME' convolution per level, forward and with
  both gradients (3x the FLOPs), compiled with `xla_options.compiler_options()`
  ('ours') and with none ('xla_default'); plus the process's matmul ceilings."""
  result = {"benchmark": "convolutions", "batch_size": batch_size,
            "compiler_options": xla_options.compiler_options()}
  for size, channels in levels:
    keys = jax.random.split(jax.random.key(0))
    images = jax.random.normal(keys[0], (batch_size, size, size, channels))
    kernel = jax.random.normal(keys[1], (3, 3, channels, channels)) * 0.05
    flops = 2.0 * batch_size * size * size * channels * channels * 9
    for pass_name, fn, pass_flops in (("forward", conv3x3, flops),
                                      ("with_gradients", _with_gradients, 3 * flops)):
      for build_name, build in (("ours", xla_options.jit), ("xla_default", jax.jit)):
        compiled = build(fn)
        seconds = timing.time_calls(lambda: compiled(images, kernel),
                                    repeats=repeats)["median"]
        result[f"gflops_{size}px_{channels}ch_{pass_name}_{build_name}"] = (
            pass_flops / seconds / 1e9)
  return {**result, **timing.ceilings()}
