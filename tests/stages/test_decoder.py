"""The decoder stage on a tiny CLIP trained once: end to end through the loop, the
image / z_i pairing, the guidance drop rates, clip_workdir errors, the paper size."""
import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from configs import clip as clip_config
from configs import decoder as decoder_config
from unclip_jax.errors import ConfigError, WorkdirError
from unclip_jax import generators
from unclip_jax.data.images import resize_image
from unclip_jax.generators import decoder as decoder_lib
from unclip_jax.generators.base import ClipSizes
from unclip_jax.generators.clip import FrozenClip
from unclip_jax.stages.decoder import DecoderStage, PairedSource
from unclip_jax.train import loop
from unclip_jax.train.metrics import read_metrics


@pytest.fixture(scope="module")
def clip_workdir(tmp_path_factory, tfds_dir):
  # The same tiny CLIP as tests/stages/test_prior.py: its programs come from the
  # persistent compilation cache when both run.
  c = clip_config.get_config("tiny")
  c.data.data_dir = tfds_dir
  c.async_checkpointing = False
  c.total_steps = c.log_every = c.eval_every = c.checkpoint_every = 2
  c.eval.num_groups = 1
  workdir = str(tmp_path_factory.mktemp("clip"))
  loop.train(c, workdir)
  return workdir


def _decoder_config(tfds_dir, clip_workdir):
  c = decoder_config.get_config("tiny")
  c.data.data_dir = tfds_dir
  c.clip_workdir = clip_workdir
  c.async_checkpointing = False
  return c


@pytest.fixture(scope="module")
def decoder_run(tmp_path_factory, tfds_dir, clip_workdir):
  config = _decoder_config(tfds_dir, clip_workdir)
  workdir = str(tmp_path_factory.mktemp("decoder"))
  metrics = loop.train(config, workdir)
  return config, workdir, metrics


@pytest.fixture(scope="module")
def stage(decoder_run):
  config, workdir, _ = decoder_run
  stage = DecoderStage(config, workdir)
  stage.prepare()  # what a resumed run does: the caches are reused
  return stage


def test_end_to_end_writes_eval_loss_and_samples(decoder_run):
  config, workdir, metrics = decoder_run
  names = set().union(*read_metrics(workdir))
  assert {"train/loss", "train/mse", "train/image_embedding_dropped",
          "train/text_dropped", "train/skipped", "eval/loss", "eval/mse",
          "eval/clip_cos", "eval/clip_top1", "eval/clip_cos_truth",
          "eval/color_accuracy", "eval/position_accuracy",
          "eval/identity_accuracy", "eval/scene_accuracy"} <= names
  assert np.isfinite(metrics["eval/loss"])
  assert {"config.json", "checkpoints", "tokenizer.model", "cache",
          "frozen_clip.json"} <= set(os.listdir(workdir))
  grid = np.asarray(Image.open(
      os.path.join(workdir, "samples", f"step_{config.total_steps}.png")))
  # A row per caption; samples_per_caption samples and the truth, enlarged to 64 px.
  e = config.eval
  assert grid.shape[0] >= e.num_samples * 64
  assert grid.shape[1] >= (e.samples_per_caption + 1) * 64


def test_images_and_embeddings_are_paired_by_index(stage):
  clip = stage.clip
  source = stage.train_source
  indices = [0, 5, 17, len(source) - 1]
  records = source.__getitems__(indices)
  images = np.stack([r["image"] for r in records])
  assert images.shape[1:] == (clip.resolution, clip.resolution, 3)  # CLIP's side
  # z_i of record i is CLIP's embedding of image i, and no other image's.
  encoded = np.asarray(clip.encode_image(images.astype(np.float32) / 127.5 - 1))
  cached = np.stack([r["image_embedding"] for r in records])
  np.testing.assert_allclose(cached, encoded, atol=1e-4)
  assert not np.allclose(cached, np.roll(encoded, 1, axis=0), atol=1e-2)
  for record in records:
    np.testing.assert_array_equal(record["tokens"],
                                  clip.tokenize([record["caption"]])[0])

  # Through the shuffled train iterator: each row's image is its z_i's image.
  batch = next(stage.train_iterator())
  assert set(batch) == {"image", "image_embedding", "tokens"}
  side = stage.config.data.resolution
  assert batch["image"].shape == (stage.config.batch_size, side, side, 3)
  everything = source.cache.arrays(fields=["image_embedding"])["image_embedding"]
  for row in range(len(batch["image"])):
    index, = np.flatnonzero(np.all(everything == batch["image_embedding"][row], 1))
    expected = resize_image(source.images[int(index)]["image"], side)
    np.testing.assert_allclose(batch["image"][row], expected / 127.5 - 1, atol=1e-6)


def test_misaligned_pairs_are_refused(stage):
  images = stage.train_source.images
  with pytest.raises(ValueError, match="records but its embedding cache"):
    PairedSource(images, stage.eval_source.cache)

  class Shifted:
    """The train cache read one record off."""
    def __init__(self, cache):
      self.cache = cache

    def __len__(self):
      return len(self.cache)

    def __getitems__(self, indices):
      return self.cache.__getitems__([(i + 1) % len(self.cache) for i in indices])

    def __getitem__(self, index):
      return self.__getitems__([index])[0]

  shifted = PairedSource(images, Shifted(stage.train_source.cache))
  with pytest.raises(ValueError, match="the cache holds"):
    shifted[3]


def test_guidance_drops_at_the_configured_rates():
  draws = jax.device_get(decoder_lib.training_draws(
      jax.random.key(0), 100_000, (1,), num_timesteps=1000,
      image_embedding_drop_prob=0.1, text_drop_prob=0.5))
  image, text = draws["drop_image_embedding"], draws["drop_text"]
  assert abs(image.mean() - 0.1) < 0.005
  assert abs(text.mean() - 0.5) < 0.005
  assert abs((image & text).mean() - 0.05) < 0.004  # independent: 10% x 50%
  assert draws["t"].min() == 0 and draws["t"].max() == 999
  assert abs(draws["t"].mean() - 499.5) < 5
  # Held-out losses drop nothing.
  none = jax.device_get(decoder_lib.training_draws(
      jax.random.key(0), 1000, (1,), num_timesteps=1000,
      image_embedding_drop_prob=0.0, text_drop_prob=0.0))
  assert not none["drop_image_embedding"].any() and not none["drop_text"].any()


def test_coordinate_channels_give_each_pixel_its_row_and_column():
  images = jnp.zeros((2, 4, 6, 3))
  with_xy = np.asarray(decoder_lib.with_coordinates(images))
  assert with_xy.shape == (2, 4, 6, 5)
  np.testing.assert_allclose(with_xy[1, :, 0, 3], [-1, -1 / 3, 1 / 3, 1], atol=1e-6)
  np.testing.assert_allclose(with_xy[0, 2, :, 4], np.linspace(-1, 1, 6), atol=1e-6)
  assert not with_xy[..., :3].any()


def test_scene_accuracy_of_the_true_images_is_perfect(stage):
  examples = stage.held_out(range(len(stage.eval_source)))
  templates = stage._templates  # pylint: disable=protected-access
  assert templates is not None
  truth = templates.accuracies(examples["image"], examples)
  assert truth == {"eval/color_accuracy": 1.0, "eval/position_accuracy": 1.0,
                   "eval/identity_accuracy": 1.0, "eval/scene_accuracy": 1.0}
  flat = np.full_like(examples["image"], 128)  # a gray square
  assert templates.accuracies(flat, examples)["eval/scene_accuracy"] < 0.2


def test_load_decoder_samples_from_the_workdir(decoder_run, stage):
  config, workdir, _ = decoder_run
  trained = generators.load(workdir, "decoder")
  decoder, params = trained.generator, trained.params
  assert trained.step == config.total_steps and trained.config.stage == "decoder"
  assert trained.clip_fingerprint == FrozenClip(config.clip_workdir).fingerprint
  examples = stage.held_out(range(4))
  side = config.data.resolution
  with_caption = decoder.sample(params, examples, jax.random.key(0), num_steps=2)
  assert with_caption.shape == (4, side, side, 3)
  assert np.isfinite(np.asarray(with_caption)).all()


@pytest.mark.parametrize("clip_workdir_value, error, message", [
    (None, ConfigError, "clip_workdir is not set"),
    ("/nonexistent/clip", WorkdirError, "does not exist"),
    ("prior_run", WorkdirError, "holds a 'prior' run"),
])
def test_clip_workdir_errors_are_one_line(tmp_path, tfds_dir, clip_workdir_value,
                                          error, message):
  if clip_workdir_value == "prior_run":
    clip_workdir_value = str(tmp_path / "prior")
    os.makedirs(clip_workdir_value)
    with open(os.path.join(clip_workdir_value, "config.json"), "w") as f:
      json.dump({"stage": "prior"}, f)
  config = _decoder_config(tfds_dir, clip_workdir_value)
  workdir = str(tmp_path / "decoder")
  with pytest.raises(error, match=message) as raised:
    loop.train(config, workdir)
  assert "\n" not in str(raised.value)
  assert not os.path.exists(workdir)  # refused before anything was made


def test_emoji_the_clip_never_saw_are_refused(tfds_dir, clip_workdir):
  config = _decoder_config(tfds_dir, clip_workdir)
  config.data.num_emoji = 16  # the tiny CLIP knows 8
  with pytest.raises(ConfigError, match="at most 8"):
    DecoderStage(config, "unused").validate()


@pytest.mark.parametrize("overrides, message", [
    ({"model.attention_resolutions": (5,)}, "model.attention_resolutions"),
    ({"model.norm_groups": 3}, "model.norm_groups"),
    ({"diffusion.parameterization": "mu"}, "diffusion.parameterization"),
    ({"model.text_drop_prob": 1.0}, "model.text_drop_prob"),
    ({"sample.num_steps": 0}, "sample.num_steps"),
])
def test_bad_configs_fail_with_one_line(overrides, message):
  c = decoder_config.get_config("tiny")
  for dotted, value in overrides.items():
    section, field = dotted.split(".")
    c[section][field] = value
  with pytest.raises(ConfigError, match=message) as raised:
    decoder_lib.validate_config(c)
  assert "\n" not in str(raised.value)


@pytest.mark.parametrize("preset", ["tiny", "demo", "paper"])
def test_presets_are_valid(preset):
  decoder_lib.validate_config(decoder_config.get_config(preset))


def test_paper_preset_has_3_5b_parameters():
  config = decoder_config.get_config("paper")
  paper_clip = clip_config.get_config("paper")
  decoder = decoder_lib.Decoder.from_config(config,
                                            ClipSizes.from_config(paper_clip))
  abstract = nn.unbox(jax.eval_shape(decoder.init_params, jax.random.key(0)))
  count = sum(leaf.size for leaf in jax.tree.leaves(abstract))
  assert abs(count - 3.5e9) / 3.5e9 < 0.10, count
  assert decoder.model.context_length == 256 and decoder.model.out_channels == 6
