"""The weight-decay mask on every stage's real parameter tree: every weight
matrix and token table decayed, no bias, norm scale or learned offset. A new
parameter of neither kind fails here until it is classified."""
import flax.linen as nn
import jax
import pytest

from configs import clip as clip_config
from configs import decoder as decoder_config
from configs import prior as prior_config
from configs import upsampler as upsampler_config
from unclip_jax.generators import generator_class
from unclip_jax.generators.base import ClipSizes
from unclip_jax.generators.clip import build_clip, init_clip_params
from unclip_jax.train.optim import decay_mask

# Parameters of two or more dimensions that are additive offsets, not weights
# an input is multiplied by: decay would pull them toward zero for no reason.
OFFSETS = {"position_embedding", "positional_embedding", "padding_embedding",
           "null_image_embedding", "null_text_embedding", "null_text_encodings",
           "query", "class_token", "positions", "log_logit_scale"}


def _is_offset(name: str) -> bool:
  """Biases, norm scales and OFFSETS: what is added to (or scales) activations
  rather than multiplying them by a matrix."""
  last = name.rsplit("/", 1)[-1]
  return last.endswith(("bias", "scale")) or last in OFFSETS


def _clip_params():
  c = clip_config.get_config("demo")
  model = build_clip(c)
  return jax.eval_shape(lambda: init_clip_params(
      model, jax.random.PRNGKey(0), c.data.resolution, c.tokenizer.context_length))


def _generator_params(stage, module):
  clip = clip_config.get_config("demo")
  config = module.get_config("demo")
  generator = generator_class(stage).from_config(config, ClipSizes.from_config(clip))
  return jax.eval_shape(generator.init_params, jax.random.PRNGKey(0))


@pytest.mark.parametrize("stage", ["clip", "prior", "decoder", "upsampler"])
def test_every_weight_matrix_is_decayed_and_nothing_else(stage):
  params = _clip_params() if stage == "clip" else _generator_params(stage, {
      "prior": prior_config, "decoder": decoder_config,
      "upsampler": upsampler_config}[stage])
  params = nn.unbox(params)
  mask = decay_mask(params)
  decayed, kept = [], []
  for (path, leaf), (_, on) in zip(
      jax.tree_util.tree_leaves_with_path(params),
      jax.tree_util.tree_leaves_with_path(mask)):
    name = jax.tree_util.keystr(path, simple=True, separator="/")
    (decayed if on else kept).append((name, leaf.shape))
  for name, shape in kept:  # never a weight matrix
    assert _is_offset(name), (stage, name, shape)
  for name, shape in decayed:  # never a bias, a scale or an offset
    assert not _is_offset(name), (stage, name, shape)
  assert any(n.endswith("qkv_kernel") for n, _ in decayed) or stage == "upsampler"
  assert any(n.endswith("emb_kernel") for n, _ in decayed) or stage in ("clip", "prior")
