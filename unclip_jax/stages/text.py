"""The caption tokenizer of a run: trained once by CLIP, reused by later stages."""
import logging
import os
from typing import Callable, Iterable

import jax
import ml_collections
from jax.experimental import multihost_utils

from unclip_jax.data.tokenizer import FILENAME, Tokenizer, partial_path

log = logging.getLogger(__name__)


def tokenizer_for_workdir(workdir: str, tokenizer_cfg: ml_collections.ConfigDict,
                          captions: Callable[[], Iterable[str]]) -> Tokenizer:
  """workdir/tokenizer.model if present; else the configured model, copied in;
  else one trained from `captions()` (on process 0) and saved there.

  Both writes go through `Tokenizer.save`, which renames a finished file into place;
  what a killed write left is logged, removed and written again.
  """
  path = os.path.join(workdir, FILENAME)
  if not os.path.exists(path) and jax.process_index() == 0:
    os.makedirs(workdir, exist_ok=True)
    remove_killed_write(path)
    given = tokenizer_cfg.get("model_path")
    if given:
      if not os.path.exists(given):
        raise FileNotFoundError(f"tokenizer.model_path={given} does not exist;"
                                " fix the path or leave it unset to train one")
      # Loaded first: a file that is not a sentencepiece model never enters the workdir.
      Tokenizer.load(given, tokenizer_cfg.context_length).save(path)
    else:
      log.info("training a %d-piece tokenizer on the training captions",
                   tokenizer_cfg.vocab_size)
      Tokenizer.train(captions(), tokenizer_cfg.vocab_size,
                      tokenizer_cfg.context_length).save(path)
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices("tokenizer")
  tokenizer = Tokenizer.load(path, tokenizer_cfg.context_length)
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
