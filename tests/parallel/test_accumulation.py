"""Gradient accumulation: the step over 4 microbatches applies the same update
as the step over the whole batch, on a (2, 2, 2) mesh."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import prior as prior_config
from unclip_jax.parallel import partitioning
from unclip_jax.parallel.mesh import make_mesh
from unclip_jax.generators.prior import build_prior_model
from unclip_jax.train import optim, state
from unclip_jax.train.step import jit_train_step, split_microbatches

EMBED_DIM, TEXT_WIDTH, CONTEXT, BATCH = 16, 12, 8, 32


def _model_and_config():
  config = prior_config.get_config("tiny")
  config.model.num_heads = 4
  config.optim.ema_decay = 0.9
  model = build_prior_model(config, embed_dim=EMBED_DIM, text_width=TEXT_WIDTH,
                            context_length=CONTEXT)
  return model, config


def _batch():
  rng = np.random.default_rng(0)
  normal = lambda *shape: rng.normal(size=shape).astype(np.float32)
  return {"noised": normal(BATCH, EMBED_DIM),
          "t": rng.integers(0, 1000, BATCH).astype(np.int32),
          "text_embedding": normal(BATCH, EMBED_DIM),
          "text_encodings": normal(BATCH, CONTEXT, TEXT_WIDTH),
          "text_mask": np.arange(CONTEXT)[None] < rng.integers(1, 9, BATCH)[:, None],
          "drop": rng.random(BATCH) < 0.3,
          "target": normal(BATCH, EMBED_DIM)}


def _loss_fn(model):
  """A per-example mean with no randomness: accumulation must be exact."""
  def loss(params, batch, rng):
    del rng
    predicted = model.apply(
        {"params": params}, batch["noised"], batch["t"],
        batch["text_embedding"], batch["text_encodings"], batch["text_mask"],
        batch["drop"])
    per_example = jnp.mean((predicted - batch["target"]) ** 2, axis=-1)
    return per_example.mean(), {"error_max": per_example.max()}
  return loss


@pytest.fixture(scope="module")
def setup():
  model, config = _model_and_config()
  init = lambda rng: model.init(
      rng, jnp.zeros((1, EMBED_DIM)), jnp.zeros((1,), jnp.int32),
      jnp.zeros((1, EMBED_DIM)), jnp.zeros((1, CONTEXT, TEXT_WIDTH)),
      jnp.ones((1, CONTEXT), bool), jnp.zeros((1,), bool))["params"]
  tx = optim.make_optimizer(config.optim, config.total_steps)
  return model, config, init, tx, _batch()


def _step(setup, mesh_shape, accum_steps):
  model, config, init, tx, batch = setup
  devices = jax.devices()[:int(np.prod(mesh_shape))]
  mesh = make_mesh(mesh_shape, devices=devices)
  rules = partitioning.rules_from_config(config.mesh.rules)
  abstract, shardings = state.abstract_state(init, tx, mesh, rules,
                                             jax.random.key(0))
  draw = np.random.default_rng(1)  # numpy params: no init to compile
  params = jax.tree.map(lambda a: draw.normal(0, 0.1, a.shape).astype(a.dtype),
                        abstract.params)
  train_state = jax.device_put(state.new_state(params, tx), shardings)
  batch_shardings = partitioning.shard_batch_tree(batch, mesh, rules)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    step = jit_train_step(_loss_fn(model), tx, 0.9, shardings,
                          batch_shardings, partitioning.replicated(mesh),
                          grad_accum_steps=accum_steps)
    new_state, metrics = step(train_state, batch, jax.random.key(1))
  return jax.device_get((new_state, metrics))


def test_four_microbatches_give_the_whole_batch_update(setup):
  whole_state, whole = _step(setup, (2, 2, 2), 1)
  accumulated_state, accumulated = _step(setup, (2, 2, 2), 4)
  np.testing.assert_allclose(accumulated["train/loss"], whole["train/loss"],
                             rtol=1e-6)
  np.testing.assert_allclose(accumulated["train/grad_norm"],
                             whole["train/grad_norm"], rtol=1e-5)
  jax.tree.map(lambda a, w: np.testing.assert_allclose(a, w, atol=1e-6),
               accumulated_state.params, whole_state.params)
  jax.tree.map(lambda a, w: np.testing.assert_allclose(a, w, atol=1e-6),
               accumulated_state.opt_state, whole_state.opt_state)


def test_microbatches_interleave_rows_so_each_device_keeps_its_own():
  rows = jnp.arange(16)
  micro = split_microbatches({"x": rows}, {"x": None}, 4)["x"]
  assert micro.shape == (4, 4)
  np.testing.assert_array_equal(micro[1], [1, 5, 9, 13])
  # Device d of 4 holds rows 4d..4d+3: in every microbatch, its column d.
  np.testing.assert_array_equal(micro[:, 2], [8, 9, 10, 11])
