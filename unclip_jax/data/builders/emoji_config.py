"""The builder config shared by `emoji` and `emoji_scenes`: resolution, subset size, seed.

Config names spell the parameters, `r{resolution}_n{num_emoji or 'all'}_s{seed}` (for example
`r32_n256_s0`), and any such name is accepted, not only the predefined ones, so
`tfds.builder("emoji_scenes/r48_n100_s3")` works without adding a config by hand.
"""
from __future__ import annotations

import dataclasses
import functools
import re

import tensorflow_datasets as tfds

_NAME_PATTERN = re.compile(r"r(\d+)_n(\d+|all)_s(\d+)")


@dataclasses.dataclass(eq=False)
class EmojiConfig(tfds.core.BuilderConfig):
  """`resolution` pixels square, the first `num_emoji` of `select_emoji(None, seed)`."""

  resolution: int = 32
  num_emoji: int | None = 256
  seed: int = 0


def config_name(resolution: int, num_emoji: int | None, seed: int) -> str:
  """32, 256, 0 -> 'r32_n256_s0'; num_emoji None (every emoji) -> 'r32_nall_s0'."""
  return f"r{resolution}_n{'all' if num_emoji is None else num_emoji}_s{seed}"


def make_config(resolution: int, num_emoji: int | None, seed: int) -> EmojiConfig:
  """The config for these parameters, named by `config_name`."""
  if resolution < 2 or (num_emoji is not None and num_emoji < 1) or seed < 0:
    raise ValueError(f"Bad emoji config: {resolution=}, {num_emoji=}, {seed=}.")
  return EmojiConfig(
      name=config_name(resolution, num_emoji, seed),
      description=f"{resolution}x{resolution} px, {num_emoji or 'all'} emoji, seed {seed}.",
      resolution=resolution,
      num_emoji=num_emoji,
      seed=seed,
  )


@functools.cache  # One object per name: tfds compares configs by identity.
def parse_config_name(name: str) -> EmojiConfig | None:
  """'r32_n256_s0' -> its config; None when the name does not follow the pattern."""
  match = _NAME_PATTERN.fullmatch(name)
  if match is None:
    return None
  resolution, num_emoji, seed = match.groups()
  return make_config(int(resolution), None if num_emoji == "all" else int(num_emoji),
                     int(seed))


PREDEFINED_CONFIGS = [
    make_config(resolution, num_emoji, 0)
    for resolution in (16, 32, 64)
    for num_emoji in (256, None)
]
DEFAULT_CONFIG_NAME = "r32_n256_s0"


class AnyConfigNameMixin:
  """Lets a builder accept any well-formed config name or an `EmojiConfig` built by hand."""

  @classmethod
  def get_builder_config(cls, name, version=None):
    predefined = super().get_builder_config(name, version)  # type: ignore[misc]
    return predefined if predefined is not None else parse_config_name(name)

  def _create_builder_config(self, builder_config, version):
    # tfds refuses a config object that is not the one its name looks up; a hand-made
    # config named by the pattern is the same config, so look it up by name instead.
    if isinstance(builder_config, EmojiConfig):
      same = parse_config_name(builder_config.name)
      if same is not None and _parameters(same) == _parameters(builder_config):
        builder_config = builder_config.name
    return super()._create_builder_config(builder_config, version)  # type: ignore[misc]


def _parameters(config: EmojiConfig) -> tuple:
  return config.resolution, config.num_emoji, config.seed


class QuietPreparationMixin:
  """tfds prints "Downloading and preparing dataset Unknown size ..." and "...
  downloaded and prepared" in bold around every build; these builders download
  nothing, and sources.prepare_bundled logs one line of its own instead."""

  def _log_download_bytes(self):
    pass

  def _log_download_done(self):
    pass
