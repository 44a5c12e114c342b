"""The demo's measure of success, independent of every model it trained.

Prompts are the scenes held out from every stage: combinations of (emoji,
colour, position) in the test split of both the CLIP's data set and the
decoder's (its first `num_emoji` emoji, a subset of the CLIP's). A sample is
scored against templates rendered exactly as the data renders scenes
(`scenes.compose_scene`) at the sample's resolution: its background colour is
the palette colour nearest its median pixel; its position and emoji are those
of the nearest template in the caption's colour (decoder_eval.SceneTemplates).
"""
import dataclasses
import json
import os

import numpy as np

from unclip_jax.data import emoji_assets, scenes
from unclip_jax.stages import decoder_eval


@dataclasses.dataclass(frozen=True)
class HeldOutPrompts:
  captions: list[str]
  labels: dict[str, np.ndarray]  # emoji_index, color_index, position_index: int [N]
  emoji_names: list[str]  # the emoji the decoder trained on, by emoji_index


def held_out_prompts(*, num_emoji: int, clip_num_emoji: int, seed: int,
                     limit: int | None = None) -> HeldOutPrompts:
  """The test-split scenes of the decoder's `num_emoji` emoji that the CLIP's
  (`clip_num_emoji`) split holds out too, in a fixed shuffled order."""
  _, decoder_test = scenes.split_combinations(num_emoji, seed)
  _, clip_test = scenes.split_combinations(clip_num_emoji, seed)
  held_out = sorted(set(decoder_test) & set(clip_test))
  order = np.random.default_rng(seed).permutation(len(held_out))[:limit]
  triples = np.asarray([held_out[i] for i in order]).reshape(-1, 3)
  entries = emoji_assets.select_emoji(num_emoji, seed)
  captions = [scenes.caption(entries[e].name, scenes.COLOR_NAMES[c],
                             scenes.POSITIONS[p]) for e, c, p in triples]
  labels = dict(zip(decoder_eval.LABELS, triples.T))
  return HeldOutPrompts(captions, labels, [e.name for e in entries])


def scene_templates(num_emoji: int, seed: int, resolution: int
                    ) -> decoder_eval.SceneTemplates:
  """Every (emoji, colour, position) scene of the first `num_emoji` emoji at
  `resolution`: what a perfect sample of each caption looks like."""
  entries = emoji_assets.select_emoji(num_emoji, seed)
  templates = np.stack([np.stack([np.stack([
      scenes.compose_scene(emoji_assets.load_rgba(entry), color, position,
                           resolution)
      for position in scenes.POSITIONS]) for color in scenes.COLOR_NAMES])
      for entry in entries])
  return decoder_eval.SceneTemplates(templates)


def true_images(prompts: HeldOutPrompts, seed: int, resolution: int) -> np.ndarray:
  """uint8 [N, R, R, 3]: the data's rendering of each prompt."""
  entries = emoji_assets.select_emoji(len(prompts.emoji_names), seed)
  return np.stack([
      scenes.compose_scene(emoji_assets.load_rgba(entries[e]), scenes.COLOR_NAMES[c],
                           scenes.POSITIONS[p], resolution)
      for e, c, p in zip(*(prompts.labels[k] for k in decoder_eval.LABELS))])


def score(samples: np.ndarray, prompts: HeldOutPrompts, num_images: int,
          seed: int) -> dict[str, float]:
  """Accuracies of uint8 samples [N * num_images, R, R, 3] (prompt-major) as
  {"color_accuracy", "position_accuracy", "identity_accuracy", "scene_accuracy"}."""
  templates = scene_templates(len(prompts.emoji_names), seed, samples.shape[1])
  labels = {k: np.repeat(v, num_images) for k, v in prompts.labels.items()}
  accuracies = templates.accuracies(samples, labels)
  return {k.split("/", 1)[1]: v for k, v in accuracies.items()}


def _read_config(workdir: str) -> dict:
  with open(os.path.join(workdir, "config.json")) as f:
    return json.load(f)


def run(root: str, *, num_images: int, seed: int) -> dict:
  """Samples every held-out prompt `num_images` times through the chain in
  root/{clip,prior,decoder,upsampler,upsampler2}, writes root/samples.png and
  returns the demo_eval.json record: prompts, accuracies, emoji_names."""
  from unclip_jax.demo.plan import UPSAMPLERS  # pylint: disable=import-outside-toplevel
  from unclip_jax.pipeline import UnCLIPPipeline  # pylint: disable=import-outside-toplevel
  decoder_data = _read_config(os.path.join(root, "decoder"))["data"]
  clip_data = _read_config(os.path.join(root, "clip"))["data"]
  prompts = held_out_prompts(num_emoji=decoder_data["num_emoji"],
                             clip_num_emoji=clip_data["num_emoji"],
                             seed=decoder_data["seed"])
  pipe = UnCLIPPipeline.from_workdirs(
      clip=os.path.join(root, "clip"), prior=os.path.join(root, "prior"),
      decoder=os.path.join(root, "decoder"),
      upsamplers=[os.path.join(root, name) for name in UPSAMPLERS
                  if os.path.isdir(os.path.join(root, name))])
  samples = pipe(prompts.captions, num_images=num_images, seed=seed)
  accuracy = score(samples, prompts, num_images, decoder_data["seed"])
  truth = true_images(prompts, decoder_data["seed"], samples.shape[1])
  path = os.path.join(root, "samples.png")
  decoder_eval.write_sample_grid(path, samples, truth, prompts.captions)
  return {
      "prompts": prompts.captions,
      "num_images": num_images,
      "seed": seed,
      "resolution": int(samples.shape[1]),
      "accuracy": {k.replace("_accuracy", ""): v for k, v in accuracy.items()},
      "emoji_names": prompts.emoji_names,
      "samples_png": path,
  }
