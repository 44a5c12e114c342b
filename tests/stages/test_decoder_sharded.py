"""The sharded decoder train step equals the 1-device step: guidance drops, t and
noise drawn inside the step do not depend on how the batch is split, and 'tensor'
really splits attention heads and conv channels."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import decoder as decoder_config
from unclip_jax.parallel import partitioning
from unclip_jax.parallel.mesh import make_mesh
from unclip_jax.stages.decoder import Decoder, DecoderStage
from unclip_jax.train import optim, state
from unclip_jax.train.step import jit_train_step

# The tiny CLIP's sizes (configs/clip.py:tiny): z_i width, vocabulary, context.
EMBED_DIM, VOCAB_SIZE, CONTEXT = 32, 256, 24


def _stage():
  config = decoder_config.get_config("tiny")
  stage = DecoderStage(config, workdir="unused")
  stage.decoder = Decoder(config, image_embedding_dim=EMBED_DIM,
                          vocab_size=VOCAB_SIZE, context_length=CONTEXT)
  return stage


def _batch(config, size=16):
  rng = np.random.default_rng(0)
  side = config.data.resolution
  tokens = rng.integers(3, VOCAB_SIZE, (size, CONTEXT))
  tokens[:, 10:] = 0  # padded captions
  return {"image": rng.uniform(-1, 1, (size, side, side, 3)).astype(np.float32),
          "image_embedding": rng.normal(size=(size, EMBED_DIM)).astype(np.float32),
          "tokens": tokens.astype(np.int32)}


def _initial_state(stage, tx):
  """Numpy-drawn params (nonzero everywhere, no init to compile per mesh)."""
  abstract = nn.unbox(jax.eval_shape(stage.init_params, jax.random.key(0)))
  rng = np.random.default_rng(1)
  params = jax.tree.map(
      lambda leaf: jnp.asarray(rng.normal(0, 0.1, leaf.shape), leaf.dtype), abstract)
  return state.new_state(params, tx)


def _two_steps(stage, batch, mesh_shape, devices):
  config = stage.config
  mesh = make_mesh(mesh_shape, devices=devices)
  rules = partitioning.rules_from_config(config.mesh.rules)
  tx = optim.make_optimizer(config.optim, config.total_steps)
  _, shardings = state.abstract_state(stage.init_params, tx, mesh, rules,
                                      jax.random.key(0))
  train_state = jax.device_put(_initial_state(stage, tx), shardings)
  batch_shardings = partitioning.shard_batch_tree(batch, mesh, rules)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    step = jit_train_step(stage.loss, tx, config.optim.ema_decay, shardings,
                          batch_shardings, partitioning.replicated(mesh))
    all_metrics = []
    for _ in range(2):
      train_state, metrics = step(train_state, batch, jax.random.key(1))
      all_metrics.append(metrics)
  return jax.device_get((train_state, all_metrics)), train_state


@pytest.fixture(scope="module")
def reference():
  stage = _stage()
  batch = _batch(stage.config)
  return stage, batch, _two_steps(stage, batch, (1, 1, 1), jax.devices()[:1])[0]


def _split_on_tensor(leaf) -> bool:
  return any(axis == "tensor" or (isinstance(axis, tuple) and "tensor" in axis)
             for axis in leaf.sharding.spec)


@pytest.mark.parametrize("mesh_shape", [(8, 1, 1), (2, 2, 2), (1, 4, 2)])
def test_sharded_step_matches_one_device(reference, mesh_shape):
  stage, batch, (ref_state, ref_metrics) = reference
  (got_state, got_metrics), live = _two_steps(stage, batch, mesh_shape, None)
  for ref, got in zip(ref_metrics, got_metrics):
    for name in ("train/loss", "train/image_embedding_dropped", "train/text_dropped"):
      np.testing.assert_allclose(got[name], ref[name], rtol=1e-5)
    np.testing.assert_allclose(got["train/grad_norm"], ref["train/grad_norm"],
                               rtol=1e-4)
  jax.tree.map(lambda g, r: np.testing.assert_allclose(g, r, atol=1e-5),
               got_state.params, ref_state.params)
  if mesh_shape[2] > 1:
    # 'tensor' splits the attention heads and the conv output channels.
    params = live.params
    assert _split_on_tensor(params["down_0_attn_0"]["qkv_kernel"])
    assert _split_on_tensor(params["down_0_res_0"]["in_conv"]["kernel"])
    assert _split_on_tensor(params["caption_encoder"]["blocks"]["qkv_kernel"])
