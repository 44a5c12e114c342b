"""The demo's last step on the tiny chain: held-out prompts through the whole
chain, scored without a model, written where the demo promises."""
import os

import numpy as np
from PIL import Image

from unclip_jax.demo import evaluate


def test_demo_evaluation_writes_samples_and_scores(tiny_chain):
  root = os.path.dirname(tiny_chain.clip)
  result = evaluate.run(root, num_images=1, seed=0)
  prompts, accuracy = result["prompts"], result["accuracy"]
  assert prompts and len(set(prompts)) == len(prompts)
  assert set(accuracy) == {"color", "position", "identity", "scene"}
  assert all(0.0 <= v <= 1.0 for v in accuracy.values())
  assert len(result["emoji_names"]) == 8  # the tiny decoder's emoji
  assert all(any(name in p for name in result["emoji_names"]) for p in prompts)
  grid = np.asarray(Image.open(result["samples_png"]))
  assert result["samples_png"] == os.path.join(root, "samples.png")
  assert grid.shape[0] >= len(prompts) * result["resolution"]
  # The same seed gives the same samples, so the same scores.
  assert evaluate.run(root, num_images=1, seed=0)["accuracy"] == accuracy
