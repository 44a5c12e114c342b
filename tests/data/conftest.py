"""Shared fixtures: one tiny `emoji_scenes` build (8 emoji at 16 px) for the whole session."""
import ml_collections
import pytest

TINY = dict(resolution=16, num_emoji=8, seed=0)


def tiny_data_config(data_dir, name="emoji_scenes") -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      name=name, data_dir=str(data_dir), image_key="image", text_key="caption", **TINY))


@pytest.fixture(scope="session")
def tiny_data_dir(tmp_path_factory):
  from unclip_jax.data import sources
  data_dir = tmp_path_factory.mktemp("tfds")
  sources.prepare_bundled("emoji_scenes", data_dir=str(data_dir), **TINY)
  return data_dir


@pytest.fixture(scope="session")
def tiny_train_source(tiny_data_dir):
  from unclip_jax.data import pipeline
  return pipeline.get_data_source(tiny_data_config(tiny_data_dir), "train")
