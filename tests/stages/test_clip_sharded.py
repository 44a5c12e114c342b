"""The sharded CLIP train step equals the 1-device step."""
import numpy as np
import pytest

from configs import clip as clip_config
from tests.stages import sharded_steps
from unclip_jax.stages.clip import ClipStage


def make_stage():
  config = clip_config.get_config("tiny")
  config.model.vision_heads = config.model.text_heads = 4  # 'tensor' shards 2
  stage = ClipStage(config, workdir="unused")
  stage.build(None)
  return stage


def make_batch(config, size=16):
  rng = np.random.default_rng(0)
  r, length = config.data.resolution, config.tokenizer.context_length
  tokens = rng.integers(3, config.tokenizer.vocab_size, (size, length))
  tokens[:, length // 2] = 2  # an end token, then padding
  tokens[:, length // 2 + 1:] = 0
  return {"image": rng.uniform(-1, 1, (size, r, r, 3)).astype(np.float32),
          "tokens": tokens.astype(np.int32)}


@pytest.fixture(scope="module")
def reference():
  stage = make_stage()
  batch = make_batch(stage.config)
  return (stage, batch) + sharded_steps.reference_steps(stage, batch)


@pytest.mark.parametrize("mesh_shape", sharded_steps.MESH_SHAPES)
def test_sharded_step_matches_one_device(reference, mesh_shape):
  stage, batch, initial, expected = reference
  got, live = sharded_steps.two_steps(stage, batch, mesh_shape, initial)
  sharded_steps.assert_steps_match(expected, got, live, mesh_shape)
