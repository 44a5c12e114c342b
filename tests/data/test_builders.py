"""The TFDS builders build without TensorFlow, deterministically, with disjoint splits."""
import logging

import numpy as np
import tensorflow_datasets as tfds

from unclip_jax.data import builders, sources
from unclip_jax.data.builders import emoji_config

from tests.data.conftest import TINY


def _triples(source):
  return {(r["emoji_index"], r["color_index"], r["position_index"])
          for r in (source[i] for i in range(len(source)))}


def test_config_names_round_trip():
  assert emoji_config.config_name(32, 256, 0) == "r32_n256_s0"
  assert emoji_config.config_name(64, None, 2) == "r64_nall_s2"
  config = emoji_config.parse_config_name("r48_n100_s3")
  assert (config.resolution, config.num_emoji, config.seed) == (48, 100, 3)
  assert emoji_config.parse_config_name("r48_n100_s3") is config
  assert emoji_config.parse_config_name("default") is None


def test_scenes_build_splits_and_features(tiny_data_dir):
  builder = tfds.builder("emoji_scenes/r16_n8_s0", data_dir=tiny_data_dir)
  assert builder.is_prepared()
  train, test = builder.as_data_source("train"), builder.as_data_source("test")
  assert (len(train), len(test)) == (352, 88)
  train_triples, test_triples = _triples(train), _triples(test)
  assert train_triples.isdisjoint(test_triples)
  assert len(train_triples | test_triples) == 8 * 11 * 5
  record = train[0]
  assert record["image"].shape == (16, 16, 3) and record["image"].dtype == np.uint8
  from unclip_jax.data import scenes
  assert record["caption"].decode() == scenes.caption(
      record["emoji_name"].decode(), scenes.COLOR_NAMES[record["color_index"]],
      scenes.POSITIONS[record["position_index"]])


def test_images_are_identical_across_builds(tiny_data_dir, tmp_path):
  builder = builders.EmojiScenes(config=emoji_config.make_config(**TINY),
                                 data_dir=tmp_path, file_format="array_record")
  builder.download_and_prepare()
  first = tfds.builder("emoji_scenes/r16_n8_s0", data_dir=tiny_data_dir)
  for split in ("train", "test"):
    old, new = first.as_data_source(split), builder.as_data_source(split)
    by_key = lambda s: {(r["emoji_index"], r["color_index"], r["position_index"]):
                        r["image"] for r in (s[i] for i in range(len(s)))}
    old_images, new_images = by_key(old), by_key(new)
    assert old_images.keys() == new_images.keys()
    assert all((old_images[k] == new_images[k]).all() for k in old_images)


def test_emoji_builder_any_config_by_name(tmp_path):
  builder = sources.prepare_bundled("emoji", resolution=24, num_emoji=5, seed=7,
                                    data_dir=str(tmp_path))
  assert builder.builder_config.name == "r24_n5_s7"
  train = tfds.data_source("emoji/r24_n5_s7", data_dir=tmp_path, split="train",
                           download=False)
  records = [train[i] for i in range(len(train))]
  assert sorted(r["emoji_index"] for r in records) == list(range(5))
  assert all(r["caption"] == r["emoji_name"] for r in records)
  assert records[0]["image"].shape == (24, 24, 3)
  test = tfds.data_source("emoji/r24_n5_s7", data_dir=tmp_path, split="test")
  assert len(test) == len(train)  # The same images: one image per name, nothing to hold out.


def test_concurrent_first_use_builds_once(tmp_path, monkeypatch):
  import threading
  builds = []
  original = tfds.core.DatasetBuilder.download_and_prepare

  def counting(self, *args, **kwargs):
    builds.append(self.builder_config.name)
    return original(self, *args, **kwargs)

  monkeypatch.setattr(tfds.core.DatasetBuilder, "download_and_prepare", counting)
  results = []
  prepare = lambda: results.append(sources.prepare_bundled(
      "emoji", resolution=8, num_emoji=3, seed=0, data_dir=str(tmp_path)).is_prepared())
  threads = [threading.Thread(target=prepare) for _ in range(3)]
  for thread in threads:
    thread.start()
  for thread in threads:
    thread.join()
  assert results == [True] * 3 and builds == ["r8_n3_s0"]


def test_a_first_build_prints_two_lines_of_ours_and_none_of_tfds(tmp_path, capfd,
                                                               caplog):
  caplog.set_level(logging.INFO)
  sources.prepare_bundled("emoji_scenes", resolution=8, num_emoji=2, seed=0,
                          data_dir=str(tmp_path))
  printed = "".join(capfd.readouterr())
  assert "Downloading and preparing" not in printed and "examples/s" not in printed
  assert not [r for r in caplog.records if "dataset_info.json" in r.getMessage()]
  ours = [r.getMessage() for r in caplog.records if r.name.startswith("unclip_jax")]
  assert len(ours) == 2 and ours[1].startswith("built it in ")
  assert ours[0].startswith("building the emoji_scenes data set (r8_n2_s0)")
  assert tfds.core.utils.tqdm_utils._active  # restored for other datasets' builds


def test_the_advice_to_install_opencv_is_dropped(caplog):
  absl_logger = logging.getLogger("absl")
  absl_logger.warning("OpenCV is not installed. We recommend using OpenCV ...")
  absl_logger.warning("another warning")
  assert [r.getMessage() for r in caplog.records] == ["another warning"]
