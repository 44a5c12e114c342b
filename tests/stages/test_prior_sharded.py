"""The sharded prior train step equals the 1-device step."""
import numpy as np
import pytest

from configs import prior as prior_config
from tests.stages import sharded_steps
from unclip_jax.generators.base import ClipSizes
from unclip_jax.stages.prior import PriorStage

EMBED_DIM, TEXT_WIDTH, CONTEXT = 16, 12, 8


def _stage():
  config = prior_config.get_config("tiny")
  config.model.num_heads = 4  # 'tensor' shards 2
  config.model.text_drop_prob = 0.5  # both branches of the null swap in a batch of 16
  stage = PriorStage(config, workdir="unused")
  rng = np.random.default_rng(1)
  stats = (rng.normal(size=EMBED_DIM) * 0.1, rng.uniform(0.05, 0.2, EMBED_DIM))
  stage.build(ClipSizes(embed_dim=EMBED_DIM, text_width=TEXT_WIDTH,
                        context_length=CONTEXT, vocab_size=64, resolution=16,
                        image_embedding_mean=tuple(stats[0]),
                        image_embedding_std=tuple(stats[1])))
  return stage


def _batch(size=16):
  rng = np.random.default_rng(0)
  unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)
  lengths = rng.integers(1, CONTEXT + 1, size)
  return {
      "image_embedding": unit(rng.normal(size=(size, EMBED_DIM))).astype(np.float32),
      "text_embedding": unit(rng.normal(size=(size, EMBED_DIM))).astype(np.float32),
      "text_encodings": rng.normal(size=(size, CONTEXT, TEXT_WIDTH)).astype(np.float16),
      "text_mask": np.arange(CONTEXT)[None] < lengths[:, None],
  }


@pytest.fixture(scope="module")
def reference():
  stage = _stage()
  batch = _batch()
  return (stage, batch) + sharded_steps.reference_steps(stage, batch)


@pytest.mark.parametrize("mesh_shape", sharded_steps.MESH_SHAPES)
def test_sharded_step_matches_one_device(reference, mesh_shape):
  stage, batch, initial, expected = reference
  got, live = sharded_steps.two_steps(stage, batch, mesh_shape, initial)
  # The same captions were dropped: the drop mask does not depend on sharding.
  sharded_steps.assert_steps_match(expected, got, live, mesh_shape,
                                   equal_keys=("train/text_dropped",))
