"""xla_options: on CPU, convolutions compile to XLA's own kernels instead of
YNNPACK's (docs/performance.md), in the train step and the samplers; the same
numbers; nothing changed for other platforms or when XLA_FLAGS say otherwise."""
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax

from unclip_jax import diffusion, xla_options
from unclip_jax.bench.convolutions import conv3x3
from unclip_jax.generators.common import make_sampler
from unclip_jax.parallel import partitioning
from unclip_jax.parallel.mesh import make_mesh
from unclip_jax.train import state
from unclip_jax.train.step import jit_train_step


def _ynn_convolutions(compiled_text: str) -> bool:
  """Whether a convolution is in a computation a YNNPACK fusion calls."""
  called = set(re.findall(r"calls=(%[\w.\-]+).*__ynn_fusion", compiled_text))
  bodies = re.split(r"\n(?=\S)", compiled_text)  # one per computation
  return any(body.split(" ")[0] in called and "convolution(" in body
             for body in bodies)


def _images_and_kernel():
  keys = jax.random.split(jax.random.key(0))
  # Big enough for YNNPACK's cost model to take it (at 8 x 8 x 16 it does not).
  return (jax.random.normal(keys[0], (2, 16, 16, 32)),
          jax.random.normal(keys[1], (3, 3, 32, 32)) * 0.1)


def test_cpu_options_keep_convolutions_out_of_ynnpack_with_the_same_numbers():
  args = _images_and_kernel()
  ours, plain = xla_options.jit(conv3x3), jax.jit(conv3x3)
  assert xla_options.compiler_options() == xla_options.CPU_OPTIONS
  # The premise: jaxlib 0.10's default hands this convolution to YNNPACK.
  assert _ynn_convolutions(plain.lower(*args).compile().as_text())
  assert not _ynn_convolutions(ours.lower(*args).compile().as_text())
  np.testing.assert_allclose(ours(*args), plain(*args), rtol=1e-5, atol=1e-5)


def test_other_platforms_and_users_own_flags_get_no_options(monkeypatch):
  assert xla_options.compiler_options("tpu") == {}
  assert xla_options.compiler_options("gpu") == {}
  monkeypatch.setenv("XLA_FLAGS", f"--{xla_options.YNN_FUSION_TYPES}=individual_dot")
  assert xla_options.compiler_options("cpu") == {}


def test_the_train_step_and_the_samplers_compile_with_them():
  images, kernel = _images_and_kernel()
  mesh = make_mesh((1, 1, 1), devices=jax.devices()[:1])
  tx = optax.sgd(0.1)
  _, shardings = state.abstract_state(lambda rng: {"kernel": kernel}, tx, mesh, (),
                                      jax.random.key(0))
  loss = lambda params, batch, rng: (
      jnp.mean(conv3x3(batch["image"], params["kernel"]) ** 2), {})
  batch = {"image": images}
  with jax.set_mesh(mesh):
    step = jit_train_step(loss, tx, 0.9, shardings,
                          partitioning.shard_batch_tree(batch, mesh, ()),
                          partitioning.replicated(mesh))
    train_state = jax.device_put(state.new_state({"kernel": kernel}, tx), shardings)
    compiled = step.lower(train_state, batch, jax.random.key(1)).compile()
  assert not _ynn_convolutions(compiled.as_text())

  apply_fn = lambda params, x_t, t, condition, drop: conv3x3(x_t, params) * 0.1
  sample = make_sampler(apply_fn, diffusion.make_schedule("cosine", 20),
                        parameterization="eps")
  compiled = sample.lower(kernel, {"c": jnp.zeros((2, 1))}, jax.random.key(0),
                          shape=images.shape, num_steps=2).compile()
  assert not _ynn_convolutions(compiled.as_text())


def test_a_jit_with_options_runs_inside_another_jit():
  # jax takes compiler options on top-level jits only; traced into an outer
  # one (the prior's sampler, FLOP counting), it compiles with the outer's.
  images, kernel = _images_and_kernel()
  inner = xla_options.jit(conv3x3)
  outer = xla_options.jit(lambda x, k: inner(x, k) * 2)
  np.testing.assert_allclose(outer(images, kernel), 2 * inner(images, kernel),
                             rtol=1e-5, atol=1e-5)
  assert jax.make_jaxpr(inner)(images, kernel).eqns
