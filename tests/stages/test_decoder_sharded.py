"""The sharded decoder train step equals the 1-device step: guidance drops, t and
noise drawn inside the step do not depend on how the batch is split, and 'tensor'
really splits attention heads and conv channels."""
import numpy as np
import pytest

from configs import decoder as decoder_config
from tests.stages import sharded_steps
from unclip_jax.generators.base import ClipSizes
from unclip_jax.stages.decoder import DecoderStage

# The tiny CLIP's sizes (configs/clip.py:tiny): z_i width, vocabulary, context.
EMBED_DIM, VOCAB_SIZE, CONTEXT = 32, 256, 24


def _stage():
  config = decoder_config.get_config("tiny")
  stage = DecoderStage(config, workdir="unused")
  stage.build(ClipSizes(embed_dim=EMBED_DIM, text_width=32, vocab_size=VOCAB_SIZE,
                        context_length=CONTEXT, resolution=16))
  return stage


def _batch(config, size=16):
  rng = np.random.default_rng(0)
  side = config.data.resolution
  tokens = rng.integers(3, VOCAB_SIZE, (size, CONTEXT))
  tokens[:, 10:] = 0  # padded captions
  return {"image": rng.uniform(-1, 1, (size, side, side, 3)).astype(np.float32),
          "image_embedding": rng.normal(size=(size, EMBED_DIM)).astype(np.float32),
          "tokens": tokens.astype(np.int32)}


@pytest.fixture(scope="module")
def reference():
  stage = _stage()
  batch = _batch(stage.config)
  return (stage, batch) + sharded_steps.reference_steps(stage, batch)


@pytest.mark.parametrize("mesh_shape", sharded_steps.MESH_SHAPES)
def test_sharded_step_matches_one_device(reference, mesh_shape):
  stage, batch, initial, expected = reference
  got, live = sharded_steps.two_steps(stage, batch, mesh_shape, initial)
  sharded_steps.assert_steps_match(
      expected, got, live, mesh_shape,
      equal_keys=("train/image_embedding_dropped", "train/text_dropped"))
  if mesh_shape[2] > 1:
    # 'tensor' splits the attention heads and the conv output channels.
    params = live.params
    for leaf in (params["down_0_attn_0"]["qkv_kernel"],
                 params["down_0_res_0"]["in_conv"]["kernel"],
                 params["caption_encoder"]["transformer"]["blocks"]["attention"]
                 ["qkv_kernel"]):
      assert sharded_steps.split_on(leaf, "tensor")
