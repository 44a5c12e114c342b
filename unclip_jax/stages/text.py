"""The caption tokenizer of a run: trained once by CLIP, reused by later stages."""
import logging
import os
from typing import Callable, Iterable

import jax
import ml_collections
from jax.experimental import multihost_utils

from unclip_jax.data.tokenizer import (Tokenizer, partial_path, tokenizer_class,
                                       tokenizer_path)
from unclip_jax.errors import ConfigError

log = logging.getLogger(__name__)


def tokenizer_for_workdir(workdir: str, tokenizer_cfg: ml_collections.ConfigDict,
                          captions: Callable[[], Iterable[str]]) -> Tokenizer:
  """workdir/tokenizer.model (clip_bpe.json for `tokenizer.kind=clip_bpe`) if
  present; else the configured model, copied in; else (sentencepiece only) one
  trained from `captions()` (on process 0) and saved there.

  Both writes go through `Tokenizer.save`, which renames a finished file into place;
  what a killed write left is logged, removed and written again.
  """
  kind = tokenizer_cfg.get("kind", "sentencepiece")
  cls = tokenizer_class(kind)
  path = tokenizer_path(workdir, tokenizer_cfg)
  if not os.path.exists(path) and jax.process_index() == 0:
    os.makedirs(workdir, exist_ok=True)
    remove_killed_write(path)
    given = tokenizer_cfg.get("model_path")
    if given:
      if not os.path.exists(given):
        raise FileNotFoundError(f"tokenizer.model_path={given} does not exist;"
                                " fix the path or leave it unset to train one")
      # Loaded first: a file that is not a tokenizer never enters the workdir.
      cls.load(given, tokenizer_cfg.context_length).save(path)
    elif kind != "sentencepiece":
      raise ConfigError(f"tokenizer.kind={kind} is never trained: set "
                        "--config.tokenizer.model_path to the checkpoint's "
                        "tokenizer folder (vocab.json, merges.txt)")
    else:
      log.info("training a %d-piece tokenizer on the training captions",
                   tokenizer_cfg.vocab_size)
      Tokenizer.train(captions(), tokenizer_cfg.vocab_size,
                      tokenizer_cfg.context_length).save(path)
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices("tokenizer")
  tokenizer = cls.load(path, tokenizer_cfg.context_length)
  if tokenizer.vocab_size > tokenizer_cfg.vocab_size:
    raise ValueError(f"{path} has {tokenizer.vocab_size} pieces but "
                     f"tokenizer.vocab_size={tokenizer_cfg.vocab_size}; raise "
                     "--config.tokenizer.vocab_size")
  return tokenizer


def remove_killed_write(path: str) -> bool:
  """Deletes the partial file a killed `Tokenizer.save(path)` left; True if there was one."""
  partial = partial_path(path)
  if not os.path.exists(partial):
    return False
  log.warning("removing %s, left by a tokenizer write that was killed", partial)
  os.remove(partial)
  return True
