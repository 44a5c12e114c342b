"""Runs one writer of derived data and kills its own process partway through.

  python -m tests.data.interrupted_writer WRITER KILL_POINT DIRECTORY

A hook installed at KILL_POINT calls os._exit(KILLED): no finally block, atexit handler
or buffered flush runs, which leaves on disk what a SIGKILL at that moment leaves. A fixed
hook is deterministic where a timed signal is not. Exit status 0 means the hook was never
reached (the test then fails). The tiny source and fake CLIP the embedding-cache writer
uses live here so that the test builds the same cache in-process.
"""
import json
import os
import sys

import numpy as np

from tests.data.conftest import TINY

KILLED = 77
WRITERS = {"dataset": ("generating", "renaming"),
           "embedding_cache": ("records", "manifest", "swap"),
           "tokenizer": ("trained", "copied")}
TOKENIZER_CAPTIONS = [f"{name} on a {color} background in the {position}"
                      for name in ("red apple", "rocket", "dog face")
                      for color in ("red", "blue", "white")
                      for position in ("top left", "center")]
CACHE_BATCH_SIZE = 4


def die(*_args, **_kwargs):
  os._exit(KILLED)


class TinyCaptionedImages:
  """Ten 4x4 images with captions and a label: a random-access source like the TFDS ones."""

  def __init__(self):
    rng = np.random.default_rng(0)
    self._images = rng.integers(0, 256, (10, 4, 4, 3), dtype=np.uint8)

  def __len__(self) -> int:
    return len(self._images)

  def __getitem__(self, index: int) -> dict:
    return {"image": self._images[index], "caption": f"picture number {index}",
            "label": np.int32(index % 3)}

  def __repr__(self) -> str:
    return "TinyCaptionedImages(10)"


class FakeClip:
  """What the cache builder asks of a FrozenClip, as deterministic numpy functions."""
  embed_dim, text_width, context_length = 4, 3, 8

  def __init__(self, fingerprint: str):
    self.fingerprint = fingerprint
    self.image_batches = 0

  def tokenize(self, captions):
    from unclip_jax.data.tokenizer import EOS_ID, PAD_ID
    tokens = np.full((len(captions), self.context_length), PAD_ID, np.int32)
    for row, caption in enumerate(captions):
      ids = [3 + ord(c) % 50 for c in caption][:self.context_length - 1] + [EOS_ID]
      tokens[row, :len(ids)] = ids
    return tokens

  def text_mask(self, tokens):
    from unclip_jax.data.tokenizer import PAD_ID
    return np.asarray(tokens) != PAD_ID

  def encode_text(self, tokens):
    tokens = np.asarray(tokens, np.float32)
    encodings = np.stack([np.sin(tokens * (k + 1)) for k in range(self.text_width)], -1)
    return encodings[:, :self.embed_dim, 0] + 0.5, encodings

  def encode_image(self, images):
    self.image_batches += 1
    images = np.asarray(images, np.float32)
    return images.reshape(len(images), -1)[:, :self.embed_dim] * 0.5


class _ClipDyingAtSecondBatch(FakeClip):

  def encode_image(self, images):
    if self.image_batches == 1:
      die()
    return super().encode_image(images)


def _interrupt_dataset(kill_point: str, data_dir: str) -> None:
  import tensorflow_datasets as tfds
  from unclip_jax.data import scenes, sources
  if kill_point == "generating":
    # train holds 352 scenes: the 400th is in the test split, after train's files.
    original, calls = scenes.compose_scene, []

    def compose_then_die(*args):
      calls.append(1)
      if len(calls) == 400:
        die()
      return original(*args)
    scenes.compose_scene = compose_then_die
  else:  # Every file written, dataset_info.json last: only tfds' rename is left.
    original = tfds.core.DatasetInfo.write_to_directory

    def write_then_die(self, *args, **kwargs):
      original(self, *args, **kwargs)
      die()
    tfds.core.DatasetInfo.write_to_directory = write_then_die
  sources.prepare_bundled("emoji_scenes", data_dir=data_dir, **TINY)


def _interrupt_embedding_cache(kill_point: str, workdir: str) -> None:
  from unclip_jax.stages import embedding_cache
  source = TinyCaptionedImages()
  build = lambda clip: embedding_cache.build_or_load(
      workdir, "test", source, clip, batch_size=CACHE_BATCH_SIZE)
  if kill_point == "records":  # the first batch handed to the writer, still buffered
    build(_ClipDyingAtSecondBatch("v1"))
  elif kill_point == "manifest":  # records complete, manifest half written and flushed
    def dump_half_then_die(manifest, file):
      text = json.dumps(manifest)
      file.write(text[:len(text) // 2])
      file.flush()
      die()
    embedding_cache.json.dump = dump_half_then_die
    build(FakeClip("v1"))
  else:  # a rebuild, between moving the old cache aside and renaming the new one in
    build(FakeClip("v1"))
    rename = os.rename

    def rename_then_die(source_path, target_path):
      rename(source_path, target_path)
      if target_path.endswith(embedding_cache.PREVIOUS_SUFFIX):
        die()
    os.rename = rename_then_die
    build(FakeClip("v2"))


def tokenizer_config(model_path=None):
  import ml_collections
  return ml_collections.ConfigDict(dict(vocab_size=64, context_length=16,
                                        model_path=model_path))


def _interrupt_tokenizer(kill_point: str, workdir: str) -> None:
  from unclip_jax.stages import text
  model_path = None
  if kill_point == "copied":
    model_path = os.path.join(workdir, "given.model")
    from unclip_jax.data.tokenizer import Tokenizer
    Tokenizer.train(TOKENIZER_CAPTIONS, 64, 16).save(model_path)
  os.replace = die  # the bytes are in the partial file, not yet renamed into place
  text.tokenizer_for_workdir(os.path.join(workdir, "run"), tokenizer_config(model_path),
                             lambda: TOKENIZER_CAPTIONS)


if __name__ == "__main__":
  writer, kill_point, directory = sys.argv[1:]
  assert kill_point in WRITERS[writer], (writer, kill_point)
  {"dataset": _interrupt_dataset, "embedding_cache": _interrupt_embedding_cache,
   "tokenizer": _interrupt_tokenizer}[writer](kill_point, directory)
