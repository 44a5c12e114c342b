"""Caption tokenizer: sentencepiece with a fixed context, padding and an end token.

The model is trained from the training captions when none is given, saved as
`workdir/tokenizer.model`, and reused by every later stage.
"""
import io
import logging
import os
from typing import Iterable, Sequence

import numpy as np
import sentencepiece as spm

PAD_ID = 0
UNK_ID = 1
EOS_ID = 2
FILENAME = "tokenizer.model"

log = logging.getLogger(__name__)


def partial_path(path: str) -> str:
  """Where `Tokenizer.save(path)` writes before renaming into place."""
  return path + ".tmp"


class Tokenizer:
  """Encodes captions to int32 [N, context_length], right-padded with PAD_ID.

  Every encoded caption ends with EOS_ID (the text tower pools there); a caption
  longer than the context is truncated, keeping its end token, with a warning.
  """

  def __init__(self, model_proto: bytes, context_length: int):
    if context_length < 2:
      raise ValueError(f"context_length={context_length}: needs at least 2 "
                       "(one token and the end token)")
    self._sp = spm.SentencePieceProcessor(model_proto=model_proto)
    self.model_proto = model_proto
    self.context_length = context_length

  @classmethod
  def load(cls, path: str, context_length: int) -> "Tokenizer":
    if not os.path.exists(path):
      raise FileNotFoundError(f"no tokenizer at {path}; train the clip stage "
                              "first or pass the tokenizer.model it wrote")
    with open(path, "rb") as f:
      return cls(f.read(), context_length)

  @classmethod
  def train(cls, captions: Iterable[str], vocab_size: int,
            context_length: int) -> "Tokenizer":
    """Trains a BPE model on `captions` (vocab_size is an upper bound)."""
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(captions), model_writer=model,
        vocab_size=vocab_size, model_type="bpe", character_coverage=1.0,
        pad_id=PAD_ID, unk_id=UNK_ID, eos_id=EOS_ID, bos_id=-1,
        # Small caption sets have fewer pieces than asked for: accept that.
        hard_vocab_limit=False, minloglevel=2, num_threads=1)
    return cls(model.getvalue(), context_length)

  def save(self, path: str) -> None:
    """Writes the model to `path` whole or not at all: a write killed midway leaves only
    `partial_path(path)`, never a truncated `path`."""
    partial = partial_path(path)
    with open(partial, "wb") as f:
      f.write(self.model_proto)
      f.flush()
      os.fsync(f.fileno())  # the rename must not reach the disk before the bytes
    os.replace(partial, path)

  @property
  def vocab_size(self) -> int:
    return self._sp.get_piece_size()

  def encode(self, texts: Sequence[str]) -> np.ndarray:
    """[N] strings -> int32 [N, context_length]."""
    if isinstance(texts, str):
      raise TypeError("encode takes a list of captions, not one string")
    out = np.full((len(texts), self.context_length), PAD_ID, np.int32)
    truncated = 0
    for row, ids in enumerate(self._sp.encode(list(texts))):
      if len(ids) > self.context_length - 1:
        truncated += 1
        ids = ids[:self.context_length - 1]
      out[row, :len(ids)] = ids
      out[row, len(ids)] = EOS_ID
    if truncated:
      log.warning("%d of %d captions are longer than the context of %d "
                      "tokens and were truncated", truncated, len(texts),
                      self.context_length)
    return out

  def decode(self, tokens: np.ndarray) -> list[str]:
    """int [N, L] -> captions, stopping at the end token."""
    texts = []
    for row in np.asarray(tokens).tolist():
      ids = row[:row.index(EOS_ID)] if EOS_ID in row else row
      texts.append(self._sp.decode([i for i in ids if i != PAD_ID]))
    return texts
