"""The prior stage on a tiny CLIP trained once: end to end through the loop, the
embedding cache (reuse, rebuild, atomic), FrozenClip, and the clip_workdir errors."""
import logging
import os

import jax
import numpy as np
import pytest

from configs import clip as clip_config
from configs import prior as prior_config
from unclip_jax.data import pipeline
from unclip_jax.errors import ConfigError, WorkdirError
from unclip_jax.stages import embedding_cache
from unclip_jax import generators
from unclip_jax.generators.clip import FrozenClip
from unclip_jax.stages.prior import PriorStage
from unclip_jax.train import loop
from unclip_jax.train.metrics import read_metrics


@pytest.fixture(scope="module")
def clip_workdir(tmp_path_factory, tfds_dir):
  c = clip_config.get_config("tiny")
  c.data.data_dir = tfds_dir
  c.async_checkpointing = False
  c.total_steps = c.log_every = c.eval_every = c.checkpoint_every = 2
  c.eval.num_groups = 1
  workdir = str(tmp_path_factory.mktemp("clip"))
  loop.train(c, workdir)
  return workdir


def _prior_config(tfds_dir, clip_workdir):
  c = prior_config.get_config("tiny")
  c.data.data_dir = tfds_dir
  c.clip_workdir = clip_workdir
  c.async_checkpointing = False
  c.eval_every = c.checkpoint_every = 4
  return c


@pytest.fixture(scope="module")
def prior_run(tmp_path_factory, tfds_dir, clip_workdir):
  config = _prior_config(tfds_dir, clip_workdir)
  workdir = str(tmp_path_factory.mktemp("prior"))
  metrics = loop.train(config, workdir)
  return config, workdir, metrics


def test_end_to_end_writes_prior_metrics(prior_run):
  config, workdir, metrics = prior_run
  rows = read_metrics(workdir)
  names = set().union(*rows)
  assert {"train/loss", "train/text_dropped", "eval/loss", "eval/prior_cos",
          "eval/prior_cos_shuffled", "eval/prior_top1",
          "eval/text_embedding_cos"} <= names
  assert -1.0 <= metrics["eval/prior_cos"] <= 1.0
  assert 0.0 <= metrics["eval/prior_top1"] <= 1.0
  assert np.isfinite(metrics["eval/loss"])
  assert {"config.json", "checkpoints", "tokenizer.model", "cache",
          "frozen_clip.json"} <= set(os.listdir(workdir))
  train_source = pipeline.get_data_source(config.data, "train")
  manifest = embedding_cache.EmbeddingCache(
      embedding_cache.cache_dir(workdir, "train"), "train").manifest
  assert manifest["num_records"] == len(train_source)
  assert manifest["clip"] == FrozenClip(config.clip_workdir).fingerprint


def test_an_analytic_prior_estimates_its_moments_at_every_evaluation(prior_run):
  config, workdir, _ = prior_run
  path = os.path.join(workdir, "eps_moments.json")
  with open(path) as f:
    written = f.read()  # by the run's last evaluation
  trained = generators.load(workdir, "prior")
  assert trained.eps_moments.step == config.total_steps
  analytic = config.copy_and_resolve_references()
  analytic.sample.sampler = "analytic"  # as the paper preset
  stage = PriorStage(analytic, workdir)
  stage.prepare()  # the caches are reused
  metrics = stage.evaluate(trained.params, 2)  # not the last step
  assert np.isfinite(metrics["eval/prior_cos"])
  moments = stage.generator.eps_moments
  assert moments.step == 2 and len(moments.values) == config.sample.moments_timesteps
  with open(path) as f:
    assert f.read() == written  # only the last step writes


def test_load_prior_samples_like_the_stage(prior_run):
  config, workdir, _ = prior_run
  trained = generators.load(workdir, "prior")
  prior, params = trained.generator, trained.params
  assert trained.step == config.total_steps and trained.config.stage == "prior"
  assert trained.clip_fingerprint == FrozenClip(config.clip_workdir).fingerprint
  cache = embedding_cache.EmbeddingCache(
      embedding_cache.cache_dir(workdir, "test"), "test")
  examples = cache.arrays(range(4))
  sampled = prior.sample(params, examples, jax.random.key(0), num_steps=3,
                         guidance_scale=2.0, num_candidates=2)
  assert sampled.shape == examples["image_embedding"].shape
  assert np.isfinite(np.asarray(sampled)).all()


def _cache_files(workdir, split):
  directory = embedding_cache.cache_dir(workdir, split)
  return {name: os.stat(os.path.join(directory, name)).st_mtime_ns
          for name in os.listdir(directory)}


def test_cache_reused_on_resume(prior_run, monkeypatch):
  config, workdir, _ = prior_run
  before = {split: _cache_files(workdir, split) for split in ("train", "test")}

  def no_encoding(*args):
    raise AssertionError("the cache was recomputed")

  monkeypatch.setattr(FrozenClip, "encode_image", no_encoding)
  monkeypatch.setattr(FrozenClip, "encode_text", no_encoding)
  stage = PriorStage(config, workdir)
  stage.prepare()  # what a resumed run does before training
  assert {split: _cache_files(workdir, split) for split in ("train", "test")} == before
  assert "params" not in vars(stage.clip)  # a cache hit never loads CLIP's weights
  batch = next(stage.train_iterator())
  assert batch["text_encodings"].shape == (config.batch_size,
                                           stage.clip.context_length,
                                           stage.clip.text_width)


class _CountingClip(FrozenClip):
  """A FrozenClip that counts image batches and can fail on a given one."""

  def __init__(self, workdir, fingerprint_suffix="", fail_at=None):
    super().__init__(workdir)
    self.fingerprint += fingerprint_suffix
    self.calls, self.fail_at = 0, fail_at

  def encode_image(self, images):
    self.calls += 1
    if self.calls == self.fail_at:
      raise KeyboardInterrupt("killed")
    return super().encode_image(images)


def test_cache_rebuilt_for_another_clip_and_never_half_written(
    clip_workdir, tfds_dir, tmp_path, caplog):
  config = _prior_config(tfds_dir, clip_workdir)
  source = pipeline.get_data_source(config.data, "test")
  workdir = str(tmp_path)
  build = lambda clip: embedding_cache.build_or_load(workdir, "test", source, clip,
                                                     batch_size=64)
  first = _CountingClip(clip_workdir)
  cache = build(first)
  assert first.calls == 2 and len(cache) == len(source)  # 88 records, 2 batches

  again = _CountingClip(clip_workdir)
  build(again)
  assert again.calls == 0

  retrained = _CountingClip(clip_workdir, fingerprint_suffix="-retrained")
  with caplog.at_level(logging.INFO, logger="unclip_jax"):
    cache = build(retrained)
  assert retrained.calls == 2
  assert "the CLIP checkpoint changed" in caplog.text
  assert cache.manifest["clip"] == retrained.fingerprint

  # Killed halfway through a rebuild: the previous complete cache is still the cache.
  killed = _CountingClip(clip_workdir, fingerprint_suffix="-again", fail_at=2)
  with pytest.raises(KeyboardInterrupt):
    build(killed)
  survivor = embedding_cache.EmbeddingCache(
      embedding_cache.cache_dir(workdir, "test"), "test")
  assert survivor.manifest["clip"] == retrained.fingerprint
  assert len(survivor) == len(source)


def test_frozen_clip_matches_the_cache(prior_run):
  config, workdir, _ = prior_run
  clip = FrozenClip(config.clip_workdir)
  assert f"@{clip.step}:" in clip.fingerprint
  cache = embedding_cache.EmbeddingCache(
      embedding_cache.cache_dir(workdir, "test"), "test")
  records = cache.arrays(range(8))
  tokens = clip.tokenize(list(records["caption"]))
  np.testing.assert_array_equal(tokens, records["tokens"])
  text_embedding, encodings = clip.encode_text(tokens)
  assert encodings.shape == (8, clip.context_length, clip.text_width)
  np.testing.assert_allclose(text_embedding, records["text_embedding"], atol=1e-5)
  np.testing.assert_allclose(np.asarray(encodings)[records["text_mask"]],
                             records["text_encodings"][records["text_mask"]],
                             atol=2e-3)  # float16 in the cache
  source = pipeline.get_data_source(config.data, "test")
  images = np.stack([pipeline.to_model_inputs(source[i])["image"] for i in range(8)])
  image_embedding = np.asarray(clip.encode_image(images))
  np.testing.assert_allclose(np.linalg.norm(image_embedding, axis=-1), 1.0, atol=1e-5)
  np.testing.assert_allclose(image_embedding, records["image_embedding"], atol=1e-5)
  assert "emoji_index" in records and "color_index" in records


def _one_line_error(error_type, config, workdir):
  with pytest.raises(error_type) as error:
    loop.train(config, workdir)
  message = str(error.value)
  assert "\n" not in message
  assert not os.path.exists(workdir)  # refused before the workdir is made
  return message


def test_missing_clip_workdir(tfds_dir, tmp_path):
  config = _prior_config(tfds_dir, None)
  message = _one_line_error(ConfigError, config, str(tmp_path / "prior"))
  assert "--config.clip_workdir=DIR" in message


def test_clip_workdir_that_does_not_exist(tfds_dir, tmp_path):
  config = _prior_config(tfds_dir, str(tmp_path / "nowhere"))
  assert "does not exist" in _one_line_error(WorkdirError, config,
                                             str(tmp_path / "prior"))


def test_clip_workdir_of_another_stage(prior_run, tfds_dir, tmp_path):
  _, prior_workdir, _ = prior_run
  config = _prior_config(tfds_dir, prior_workdir)
  message = _one_line_error(WorkdirError, config, str(tmp_path / "prior"))
  assert "'prior'" in message and "'clip'" in message


def test_data_must_match_the_clip(clip_workdir, tfds_dir, tmp_path):
  config = _prior_config(tfds_dir, clip_workdir)
  config.data.resolution = 32
  message = _one_line_error(ConfigError, config, str(tmp_path / "prior"))
  assert "--config.data.resolution=16" in message
