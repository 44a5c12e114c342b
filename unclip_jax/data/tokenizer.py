"""Caption tokenizer: sentencepiece with a fixed context, padding and an end token.

The model is trained from the training captions when none is given, saved as
`workdir/tokenizer.model`, and reused by every later stage. A CLIP converted
from a published checkpoint reads captions with CLIP's own byte-level BPE
instead (data/clip_bpe.py); `tokenizer.kind` in the config picks one, and
`load_tokenizer` / `tokenizer_path` open the right one. Both have the same
interface: encode, decode, vocab_size, context_length, pad_id, end_id, unk_id
(None: no unknown pieces), text_mask, with_context, save, serialized, filename.
"""
import io
import logging
import os
from typing import Iterable, Sequence

import numpy as np
import sentencepiece as spm

from unclip_jax.errors import ConfigError

PAD_ID = 0
UNK_ID = 1
EOS_ID = 2
FILENAME = "tokenizer.model"
KINDS = ("sentencepiece", "clip_bpe")

log = logging.getLogger(__name__)


def text_mask(tokens, pad_id: int, end_id: int) -> np.ndarray:
  """bool [N, L] of right-padded int [N, L] tokens: True at the real tokens, up to
  and including each row's first end token (right also when the pad id is the
  end id); a row without an end token: True where it is not `pad_id`."""
  tokens = np.asarray(tokens)
  is_end = tokens == end_id
  # Positions after the first end token are padding.
  before_end = np.cumsum(is_end, axis=-1) - is_end == 0
  return np.where(is_end.any(axis=-1, keepdims=True), before_end,
                  tokens != pad_id)


def partial_path(path: str) -> str:
  """Where `Tokenizer.save(path)` writes before renaming into place."""
  return path + ".tmp"


class Tokenizer:
  """Encodes captions to int32 [N, context_length], right-padded with PAD_ID.

  Every encoded caption ends with EOS_ID (the text tower pools there); a caption
  longer than the context is truncated, keeping its end token, with a warning.
  """
  kind = "sentencepiece"
  filename = FILENAME
  pad_id = PAD_ID
  end_id = EOS_ID
  unk_id = UNK_ID

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
  def serialized(self) -> bytes:
    """The bytes `save` writes: equal for equal tokenizers."""
    return self.model_proto

  def with_context(self, context_length: int) -> "Tokenizer":
    return Tokenizer(self.model_proto, context_length)

  @property
  def vocab_size(self) -> int:
    return self._sp.get_piece_size()

  def text_mask(self, tokens) -> np.ndarray:
    """bool [N, L]: True at real tokens (the end token included); ours never
    pads with the end token, so this is every non-pad token."""
    return np.asarray(tokens) != PAD_ID

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


def tokenizer_class(kind: str):
  """The tokenizer class of a config's `tokenizer.kind`."""
  if kind == "sentencepiece":
    return Tokenizer
  if kind == "clip_bpe":
    # Imported here: clip_bpe imports this module.
    from unclip_jax.data.clip_bpe import ClipBpeTokenizer  # pylint: disable=import-outside-toplevel
    return ClipBpeTokenizer
  raise ConfigError(f"tokenizer.kind={kind!r} is none of {', '.join(KINDS)}; set "
                    "--config.tokenizer.kind")


def tokenizer_path(workdir: str, tokenizer_cfg) -> str:
  """Where a workdir keeps the tokenizer of `tokenizer_cfg` (a config's
  `tokenizer`): tokenizer.model, or clip_bpe.json."""
  kind = tokenizer_cfg.get("kind", "sentencepiece")
  return os.path.join(workdir, tokenizer_class(kind).filename)


def load_tokenizer(workdir: str, tokenizer_cfg):
  """The tokenizer a workdir keeps, of the kind its config names."""
  kind = tokenizer_cfg.get("kind", "sentencepiece")
  return tokenizer_class(kind).load(tokenizer_path(workdir, tokenizer_cfg),
                                    tokenizer_cfg.context_length)
