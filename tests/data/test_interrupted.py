"""A killed write of derived data is never read half-done, and the next run redoes it.

Each writer (the TFDS build of the bundled data, the embedding cache, the workdir's
tokenizer) runs in a subprocess that kills itself partway (tests/data/interrupted_writer);
then the same call here, the next run, must log what the kill left in one line, remove
it, and write a result equal to a clean build.
"""
import logging
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow_datasets as tfds

from tests.data import interrupted_writer as writer
from tests.data.conftest import TINY

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _run_killed(name: str, kill_point: str, directory) -> None:
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env.update(PYTHONPATH=ROOT, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3")
  result = subprocess.run(
      [sys.executable, "-m", "tests.data.interrupted_writer", name, kill_point,
       str(directory)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
  assert result.returncode == writer.KILLED, result.stdout + result.stderr


def _killed_lines(caplog) -> list[str]:
  return [r.getMessage() for r in caplog.records if "that was killed" in r.getMessage()]


def _all_records(source) -> list[dict]:
  return [source[i] for i in range(len(source))]


def _assert_same_records(got: list[dict], want: list[dict]) -> None:
  assert len(got) == len(want)
  for got_record, want_record in zip(got, want):
    assert got_record.keys() == want_record.keys()
    for key in want_record:
      np.testing.assert_array_equal(got_record[key], want_record[key], err_msg=key)


TINY_CONFIG = "r{resolution}_n{num_emoji}_s{seed}".format(**TINY)
TINY_NAME = f"emoji_scenes/{TINY_CONFIG}"


@pytest.mark.parametrize("kill_point", writer.WRITERS["dataset"])
def test_killed_dataset_build_is_ignored_then_rebuilt(kill_point, tiny_data_dir,
                                                      tmp_path, caplog):
  from unclip_jax.data import sources
  _run_killed("dataset", kill_point, tmp_path)
  config_dir = tmp_path / "emoji_scenes" / TINY_CONFIG
  leftovers = list(config_dir.glob("incomplete.*"))
  assert len(leftovers) == 1
  if kill_point == "renaming":  # complete but for tfds' rename: still not a dataset
    assert (leftovers[0] / "dataset_info.json").exists()
  assert not tfds.builder(TINY_NAME, data_dir=tmp_path).is_prepared()

  with caplog.at_level(logging.WARNING, logger="unclip_jax"):
    rebuilt = sources.prepare_bundled("emoji_scenes", data_dir=str(tmp_path), **TINY)
  assert len(_killed_lines(caplog)) == 1 and str(leftovers[0]) in caplog.text
  assert [p.name for p in config_dir.iterdir()] == ["1.0.0"]
  clean = tfds.builder(TINY_NAME, data_dir=tiny_data_dir)
  for split in ("train", "test"):
    _assert_same_records(_all_records(rebuilt.as_data_source(split)),
                         _all_records(clean.as_data_source(split)))


def _cache_contents(workdir: str) -> tuple[dict, list[dict]]:
  from unclip_jax.stages import embedding_cache
  cache = embedding_cache.EmbeddingCache(
      embedding_cache.cache_dir(workdir, "test"), "test")
  return cache.manifest, _all_records(cache)


def _build_cache(workdir, fingerprint: str):
  from unclip_jax.stages import embedding_cache
  clip = writer.FakeClip(fingerprint)
  embedding_cache.build_or_load(str(workdir), "test", writer.TinyCaptionedImages(),
                                clip, batch_size=writer.CACHE_BATCH_SIZE)
  return clip


@pytest.mark.parametrize("kill_point", writer.WRITERS["embedding_cache"])
def test_killed_embedding_cache_build_is_ignored_then_rebuilt(kill_point, tmp_path,
                                                              caplog):
  from unclip_jax.stages import embedding_cache
  workdir = tmp_path / "run"
  _run_killed("embedding_cache", kill_point, workdir)
  directory = embedding_cache.cache_dir(str(workdir), "test")
  assert not os.path.exists(directory)  # nothing a reader could take for a cache
  fingerprint = "v2" if kill_point == "swap" else "v1"

  with caplog.at_level(logging.WARNING, logger="unclip_jax"):
    clip = _build_cache(workdir, fingerprint)
  assert clip.image_batches == 3  # rebuilt: 10 records in batches of 4
  assert len(_killed_lines(caplog)) == 1
  assert sorted(os.listdir(os.path.dirname(directory))) == ["test"]
  _build_cache(tmp_path / "clean", fingerprint)
  (manifest, records), (clean_manifest, clean_records) = (
      _cache_contents(str(workdir)), _cache_contents(str(tmp_path / "clean")))
  assert manifest == clean_manifest and manifest["clip"] == fingerprint
  _assert_same_records(records, clean_records)


def test_cache_with_an_unreadable_manifest_is_rebuilt(tmp_path, caplog):
  from unclip_jax.stages import embedding_cache
  _build_cache(tmp_path, "v1")
  manifest_path = os.path.join(embedding_cache.cache_dir(str(tmp_path), "test"),
                               embedding_cache.MANIFEST)
  with open(manifest_path, "r+") as f:
    f.truncate(40)
  with caplog.at_level(logging.INFO, logger="unclip_jax"):
    clip = _build_cache(tmp_path, "v1")
  assert clip.image_batches == 3 and "its manifest is unreadable" in caplog.text
  assert _cache_contents(str(tmp_path))[0]["num_records"] == 10


@pytest.mark.parametrize("kill_point", writer.WRITERS["tokenizer"])
def test_killed_tokenizer_write_is_ignored_then_redone(kill_point, tmp_path, caplog):
  from unclip_jax.data.tokenizer import FILENAME, partial_path
  from unclip_jax.stages import text
  _run_killed("tokenizer", kill_point, tmp_path)
  path = tmp_path / "run" / FILENAME
  assert not path.exists() and os.path.exists(partial_path(str(path)))
  given = str(tmp_path / "given.model") if kill_point == "copied" else None

  def tokenizer_model(workdir) -> bytes:
    text.tokenizer_for_workdir(str(workdir), writer.tokenizer_config(given),
                               lambda: writer.TOKENIZER_CAPTIONS)
    return (workdir / FILENAME).read_bytes()

  with caplog.at_level(logging.WARNING, logger="unclip_jax"):
    model = tokenizer_model(tmp_path / "run")
  assert len(_killed_lines(caplog)) == 1
  assert not os.path.exists(partial_path(str(path)))
  assert model == tokenizer_model(tmp_path / "clean")


def test_a_given_tokenizer_that_is_not_a_model_never_enters_the_workdir(tmp_path):
  from unclip_jax.data.tokenizer import FILENAME
  from unclip_jax.stages import text
  given = tmp_path / "not_a.model"
  given.write_bytes(b"\x00 not a sentencepiece model")
  with pytest.raises(RuntimeError, match="ParseFromArray"):  # sentencepiece
    text.tokenizer_for_workdir(str(tmp_path / "run"),
                               writer.tokenizer_config(str(given)), lambda: [])
  assert not (tmp_path / "run" / FILENAME).exists()
