"""Mixed precision: with `dtype=bfloat16` every stage's loss and gradients
stay close to float32's for the same params and batch, while params, loss and
gradients stay float32."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import clip, decoder, prior, upsampler
from unclip_jax.compile import stage_for_compile

CONFIGS = {"clip": clip, "prior": prior, "decoder": decoder,
           "upsampler": upsampler}


def random_batch(structs: dict, vocab_size: int) -> dict:
  """Plausible numpy data for a batch of ShapeDtypeStructs."""
  rng = np.random.default_rng(0)
  batch = {}
  for name, struct in structs.items():
    if struct.dtype == np.bool_:
      value = np.arange(struct.shape[1])[None] < rng.integers(
          1, struct.shape[1] + 1, (struct.shape[0], 1))
    elif struct.dtype == np.int32:  # tokens: an end token, then padding
      value = rng.integers(3, vocab_size, struct.shape)
      value[:, struct.shape[1] // 2] = 2
      value[:, struct.shape[1] // 2 + 1:] = 0
    elif name == "image":
      value = rng.uniform(-1, 1, struct.shape)
    else:
      value = rng.normal(size=struct.shape)
      if name.endswith("_embedding"):  # CLIP embeddings are unit vectors
        value /= np.linalg.norm(value, axis=-1, keepdims=True)
    batch[name] = np.asarray(value, struct.dtype)
  return batch


def _loss_and_grads(name: str, dtype: str, params=None):
  config = CONFIGS[name].get_config("tiny")
  config.dtype = dtype
  clip_config = clip.get_config("tiny")
  stage = stage_for_compile(config, clip_config)
  structs = stage.abstract_batch()
  if params is None:  # numpy-drawn: nonzero everywhere, no init to compile
    abstract = nn.unbox(jax.eval_shape(stage.init_params, jax.random.key(0)))
    draw = np.random.default_rng(1)
    params = jax.tree.map(
        lambda a: draw.normal(0, 0.1, a.shape).astype(a.dtype), abstract)
  batch = random_batch(structs, clip_config.tokenizer.vocab_size)
  grad_fn = jax.jit(jax.value_and_grad(stage.loss, has_aux=True))
  (loss, _), grads = grad_fn(params, batch, jax.random.key(2))
  return params, jax.device_get((loss, grads))


def _cosine(a, b) -> float:
  a = np.concatenate([np.ravel(x) for x in jax.tree.leaves(a)])
  b = np.concatenate([np.ravel(x) for x in jax.tree.leaves(b)])
  return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_bfloat16_compute_stays_close_to_float32(name):
  params, (loss32, grads32) = _loss_and_grads(name, "float32")
  _, (loss16, grads16) = _loss_and_grads(name, "bfloat16", params)
  assert loss16.dtype == jnp.float32
  assert all(g.dtype == jnp.float32 for g in jax.tree.leaves(grads16))
  np.testing.assert_allclose(loss16, loss32, rtol=3e-2)
  assert _cosine(grads16, grads32) > 0.98
