"""The sharded upsampler train step equals the 1-device step: degradation, low-res
noise and crops made inside the step do not depend on how the batch is split."""
import numpy as np
import pytest

from configs import upsampler as upsampler_config
from tests.stages import sharded_steps
from unclip_jax.stages.upsampler import UpsamplerStage


def _stage():
  config = upsampler_config.get_config("tiny")
  stage = UpsamplerStage(config, workdir="unused")
  stage.build(None)
  return stage


def _batch(config, size=16):
  side = config.data.resolution
  rng = np.random.default_rng(0)
  return {"image": rng.uniform(-1, 1, (size, side, side, 3)).astype(np.float32)}


@pytest.fixture(scope="module")
def reference():
  stage = _stage()
  batch = _batch(stage.config)
  return (stage, batch) + sharded_steps.reference_steps(stage, batch)


@pytest.mark.parametrize("mesh_shape", sharded_steps.MESH_SHAPES)
def test_sharded_step_matches_one_device(reference, mesh_shape):
  stage, batch, initial, expected = reference
  got, live = sharded_steps.two_steps(stage, batch, mesh_shape, initial)
  sharded_steps.assert_steps_match(expected, got, live, mesh_shape)
