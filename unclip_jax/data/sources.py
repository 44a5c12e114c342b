"""Random-access data sources: the bundled builders (built on first use) or any TFDS dataset.

Every source returned here yields records keyed the same way whatever the dataset:
`image` (uint8 [H, W, C]) and `caption` (str), plus the dataset's other fields with text
decoded to str. The pipeline and the stages only ever see these two names.
"""
from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import time

import numpy as np
import tensorflow_datasets as tfds
from etils import epath
from tensorflow_datasets.core import constants as tfds_constants
from tensorflow_datasets.core.utils import tqdm_utils

from unclip_jax.data import builders
from unclip_jax.data.builders import emoji_config

BUNDLED_BUILDERS = {"emoji": builders.Emoji, "emoji_scenes": builders.EmojiScenes}
IMAGE = "image"
CAPTION = "caption"

log = logging.getLogger(__name__)


class _DropMessages(logging.Filter):
  """Drops log records whose text contains one of `fragments`."""

  def __init__(self, *fragments: str):
    super().__init__()
    self.fragments = fragments

  def filter(self, record: logging.LogRecord) -> bool:
    try:
      text = record.getMessage()
    except (TypeError, ValueError):  # a malformed record: let its handler say so
      return True
    return not any(fragment in text for fragment in self.fragments)


# tfds (through absl) advises installing OpenCV the first time it decodes an
# image, in every process; PIL decodes these small PNGs fine, so it is noise.
logging.getLogger("absl").addFilter(_DropMessages("OpenCV is not installed"))
# What tfds warns about a variant folder it has not built yet: the case
# prepare_bundled handles by building it.
_NOT_BUILT_YET = _DropMessages("has no dataset_info.json")


def decode_text(value):
  """bytes -> str (tfds data sources return Text features as bytes); lists and arrays of
  bytes element-wise; anything else unchanged."""
  if isinstance(value, bytes):
    return value.decode("utf-8")
  if isinstance(value, np.ndarray) and value.dtype.kind in "OS":
    return np.array([decode_text(v) for v in value.ravel()], dtype=object).reshape(value.shape)
  if isinstance(value, (list, tuple)):
    return type(value)(decode_text(v) for v in value)
  return value


def decode_record(record: dict) -> dict:
  """Decodes every text field of a (possibly nested) record to str."""
  return {k: decode_record(v) if isinstance(v, dict) else decode_text(v)
          for k, v in record.items()}


def _pop_path(record: dict, path: str):
  """Removes and returns record['a']['b'] for path 'a/b'."""
  *parents, leaf = path.split("/")
  for key in parents:
    record = record[key]
  return record.pop(leaf)


class CaptionedImageSource:
  """Wraps a tfds data source: renames its image and text fields to `image` and `caption`
  and decodes text to str. Random access: `len(source)`, `source[i]`."""

  def __init__(self, source, *, image_key: str = IMAGE, text_key: str = CAPTION,
               description: str = ""):
    self._source = source
    self._image_key = image_key
    self._text_key = text_key
    # grain checks repr(source) when restoring an iterator, so it must not hold an address.
    self._description = description or repr(source)

  def __len__(self) -> int:
    return len(self._source)

  def _standardize(self, record: dict) -> dict:
    record = dict(record)
    image = _pop_path(record, self._image_key)
    caption = _pop_path(record, self._text_key)
    record = decode_record(record)
    record[IMAGE] = np.asarray(image)
    record[CAPTION] = decode_text(caption)
    return record

  def __getitem__(self, index: int) -> dict:
    return self._standardize(self._source[index])

  def __getitems__(self, indices) -> list[dict]:
    if hasattr(self._source, "__getitems__"):  # ArrayRecord reads a batch in one call.
      return [self._standardize(r) for r in self._source.__getitems__(list(indices))]
    return [self[i] for i in indices]

  def __repr__(self) -> str:
    return f"CaptionedImageSource({self._description})"


@contextlib.contextmanager
def _build_lock(data_dir: str, dataset: str, config_name: str):
  """Serialises builds of one config on this machine; a no-op on remote file systems.

  The first caller builds, the others wait and then find the dataset prepared. Hosts of a
  pod each build into their own local data_dir (the result is identical), or one host
  builds into a shared bucket before the others start. Yields whether the lock is held.
  """
  if "://" in data_dir:
    yield False
    return
  os.makedirs(data_dir, exist_ok=True)
  with open(os.path.join(data_dir, f".{dataset}-{config_name}.lock"), "w") as lock_file:
    fcntl.flock(lock_file, fcntl.LOCK_EX)  # The kernel releases it if we are killed.
    try:
      yield True
    finally:
      fcntl.flock(lock_file, fcntl.LOCK_UN)


def remove_killed_builds(builder: tfds.core.DatasetBuilder) -> list[str]:
  """Deletes the folders that killed builds of `builder`'s config left; returns them.

  tfds (4.9) builds into `incomplete.XXXXXX_<version>/` beside the version folder and
  renames it into place only when every file is written, so `is_prepared()` and readers
  never see a half-built dataset. A SIGKILLed build skips tfds' own clean-up, though, and
  the next build picks a new random name, so these folders would stay forever. Call it
  only while holding the build lock: a build in progress has the same kind of name.
  """
  version_dir = epath.Path(builder.data_path)
  pattern = f"{tfds_constants.INCOMPLETE_PREFIX}*_{version_dir.name}"
  leftovers = sorted(os.fspath(path) for path in version_dir.parent.glob(pattern))
  if leftovers:
    log.warning("removing %s, left by a dataset build that was killed",
                " and ".join(leftovers))
  for leftover in leftovers:
    epath.Path(leftover).rmtree()
  return leftovers


def prepare_bundled(name: str, *, resolution: int, num_emoji: int | None, seed: int,
                    data_dir: str | None = None) -> tfds.core.DatasetBuilder:
  """The prepared builder for `emoji` or `emoji_scenes`; builds it only if missing."""
  builder_class = BUNDLED_BUILDERS[name]
  config = emoji_config.make_config(resolution, num_emoji, seed)

  def make_builder():
    return builder_class(config=config, data_dir=data_dir, file_format="array_record")

  builder = make_builder()
  if _is_prepared(builder):  # The common case: no lock, no writes.
    return builder
  with _build_lock(os.fspath(builder.data_dir_root), name, config.name) as locked:
    builder = make_builder()  # Another process may have finished while we waited.
    if not _is_prepared(builder):
      if locked:
        remove_killed_builds(builder)
      log.info("building the %s data set (%s) in %s, once", name, config.name,
               builder.data_dir_root)
      started = time.monotonic()
      with _no_progress_bars():
        builder.download_and_prepare()
      log.info("built it in %.1f s", time.monotonic() - started)
  return builder


def _is_prepared(builder: tfds.core.DatasetBuilder) -> bool:
  absl_logger = logging.getLogger("absl")
  absl_logger.addFilter(_NOT_BUILT_YET)
  try:
    return builder.is_prepared()
  finally:
    absl_logger.removeFilter(_NOT_BUILT_YET)


@contextlib.contextmanager
def _no_progress_bars():
  """tfds' progress bars for a build of seconds to a minute are a screenful of
  carriage returns in a log; the caller logs the build's start and end."""
  was_active = getattr(tqdm_utils, "_active", True)  # tfds has no public getter
  tfds.disable_progress_bar()
  try:
    yield
  finally:
    tfds.display_progress_bar(was_active)


def get_data_source(data_cfg, split: str) -> CaptionedImageSource:
  """A random-access source of {'image': uint8 [H, W, C], 'caption': str, ...} records.

  `data_cfg` fields: name ('emoji_scenes', 'emoji' or any TFDS dataset prepared as
  array_record in data_dir), data_dir (None: the tfds default), resolution, num_emoji (0 or
  None: every emoji) and seed (bundled data only), image_key and text_key (the dataset's
  field names), and
  optionally download (other datasets: let tfds prepare a missing one; default False).
  """
  name, data_dir = data_cfg.name, data_cfg.get("data_dir")
  if name in BUNDLED_BUILDERS:
    builder = prepare_bundled(name, resolution=data_cfg.resolution,
                              num_emoji=data_cfg.get("num_emoji") or None,
                              seed=data_cfg.seed,
                              data_dir=data_dir)
    source = builder.as_data_source(split)
    description = f"{name}/{builder.builder_config.name}, split={split!r}"
  else:
    source = tfds.data_source(name, split=split, data_dir=data_dir,
                              download=data_cfg.get("download", False))
    description = f"{name}, split={split!r}"
  return CaptionedImageSource(source, image_key=data_cfg.get("image_key", IMAGE),
                              text_key=data_cfg.get("text_key", CAPTION),
                              description=description)
