"""configs/clip.py:paper builds the paper's CLIP, abstractly (nothing allocated)."""
import jax

from configs import clip as clip_config
from unclip_jax.stages.clip import ClipStage

# ViT-H/16 at 256 px (632,307,200) + causal text tower width 1024, 24 blocks,
# vocab 49408, context 77 (354,032,640) + the logit scale.
PAPER_CLIP_PARAMS = 986_339_841


def test_paper_preset_parameter_count():
  config = clip_config.get_config("paper")
  stage = ClipStage(config, workdir="unused")
  stage.build(None)
  abstract = jax.eval_shape(stage.init_params, jax.random.key(0))
  count = sum(x.size for x in jax.tree.leaves(abstract))
  assert count == PAPER_CLIP_PARAMS
  vision = sum(x.size for x in jax.tree.leaves(abstract["vision"]))
  assert abs(vision / 632e6 - 1) < 0.01  # ViT-H/16
