"""CLIP's byte-level BPE tokenizer, for CLIP checkpoints converted from OpenAI,
open_clip or transformers (data/tokenizer.py is ours, trained on the captions).

Built with the `tokenizers` library from a checkpoint's own vocab.json and
merges.txt (nothing is downloaded): NFC, whitespace runs collapsed to one space,
lowercase; CLIP's split into letter runs, single digits, punctuation runs and the
English contractions; bytes as printable characters; BPE whose word-final symbols
end in "</w>". Every caption becomes <|startoftext|> pieces <|endoftext|>, then
padding, as transformers' CLIPTokenizer gives with padding="max_length",
truncation=True: a long caption keeps its first context - 2 pieces and the end
token. The pad id is the checkpoint's: transformers folders (Karlo's) name a pad
token in tokenizer_config.json / special_tokens_map.json (by default the end
token); OpenAI's and open_clip's tokenizers pad with 0.

The workdir keeps one file, `clip_bpe.json` (vocabulary, merges, pad token).
"""
import copy
import json
import logging
import os
from typing import Sequence

import numpy as np
from tokenizers import Regex, Tokenizer, decoders, normalizers, pre_tokenizers
from tokenizers.models import BPE

from unclip_jax.data.tokenizer import partial_path, text_mask

FILENAME = "clip_bpe.json"
START_TOKEN = "<|startoftext|>"
END_TOKEN = "<|endoftext|>"
END_OF_WORD = "</w>"
# CLIP's pre-tokenizer: the special tokens, English contractions, runs of letters,
# single digits, runs of other non-space characters; spaces dropped.
SPLIT_PATTERN = (r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|"
                 r"[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+")
_FORMAT = "clip_bpe/1"
_FROM_FOLDER = object()  # from_checkpoint's default pad token: read the folder's

log = logging.getLogger(__name__)


def _token_text(value) -> str | None:
  """A special token as tokenizer_config.json writes it: a string or
  {"content": ...}."""
  if isinstance(value, dict):
    return value.get("content")
  return value


def read_merges(path: str) -> list[str]:
  """merges.txt -> ["a b", ...] in rank order, without the "#version" header."""
  with open(path, encoding="utf-8") as f:
    lines = f.read().split("\n")
  return [line for line in lines if line and not line.startswith("#version")]


def read_tokenizer_json(path: str) -> tuple[dict[str, int], list[str]]:
  """(vocab, merges as "a b") of a `tokenizers` tokenizer.json holding CLIP's BPE."""
  with open(path, encoding="utf-8") as f:
    model = json.load(f).get("model", {})
  if model.get("type") != "BPE" or model.get("end_of_word_suffix") != END_OF_WORD:
    raise ValueError(f"{path} does not hold CLIP's BPE (a BPE model whose word-final "
                     f"pieces end in {END_OF_WORD!r})")
  merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
  return dict(model["vocab"]), merges


def checkpoint_pad_token(directory: str) -> str | None:
  """The pad token a checkpoint's tokenizer folder names: that of
  tokenizer_config.json, else special_tokens_map.json, else (a transformers
  folder naming none) the end token, as CLIPTokenizer defaults; None for a
  folder without either file (OpenAI / open_clip: pad with id 0)."""
  found_config = False
  for name in ("tokenizer_config.json", "special_tokens_map.json"):
    path = os.path.join(directory, name)
    if not os.path.exists(path):
      continue
    found_config = True
    with open(path, encoding="utf-8") as f:
      pad = _token_text(json.load(f).get("pad_token"))
    if pad is not None:
      return pad
  return END_TOKEN if found_config else None


class ClipBpeTokenizer:
  """Encodes captions to int32 [N, context_length]: start token, BPE pieces,
  end token, then `pad_id`. Same interface as data/tokenizer.Tokenizer."""

  kind = "clip_bpe"
  filename = FILENAME
  unk_id = None  # byte-level: every character has pieces

  def __init__(self, vocab: dict[str, int], merges: Sequence[str],
               context_length: int, pad_token: str | None = None):
    """`pad_token` None pads with id 0 (OpenAI / open_clip)."""
    if context_length < 3:
      raise ValueError(f"context_length={context_length}: needs at least 3 (the "
                       "start token, one piece and the end token)")
    for token in (START_TOKEN, END_TOKEN) + ((pad_token,) if pad_token else ()):
      if token not in vocab:
        raise ValueError(f"the vocabulary has no {token!r}: not a CLIP tokenizer")
    self.vocab = dict(vocab)
    self.merges = list(merges)
    self.context_length = context_length
    self.pad_token = pad_token
    self.start_id = self.vocab[START_TOKEN]
    self.end_id = self.vocab[END_TOKEN]
    self.pad_id = self.vocab[pad_token] if pad_token else 0
    self._tokenizer = self._build()

  def _build(self) -> Tokenizer:
    merges = [tuple(line.split(" ")) for line in self.merges]
    tokenizer = Tokenizer(BPE(
        vocab=self.vocab, merges=merges, continuing_subword_prefix="",
        end_of_word_suffix=END_OF_WORD, fuse_unk=False, unk_token=END_TOKEN))
    tokenizer.normalizer = normalizers.Sequence([
        normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "),
        normalizers.Lowercase()])
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="removed",
                             invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tokenizer.decoder = decoders.ByteLevel()
    # Written in a caption, these are the tokens themselves (as in transformers).
    specials = [START_TOKEN, END_TOKEN]
    if self.pad_token and self.pad_token not in specials:
      specials.append(self.pad_token)
    tokenizer.add_special_tokens(specials)
    return tokenizer

  @classmethod
  def from_checkpoint(cls, directory: str, context_length: int,
                      pad_token=_FROM_FOLDER) -> "ClipBpeTokenizer":
    """From a checkpoint's tokenizer folder: vocab.json + merges.txt (or the
    tokenizer.json that transformers 5 writes instead), and the pad token of its
    tokenizer config (`checkpoint_pad_token`) unless given (a token, or None to
    pad with id 0)."""
    paths = [os.path.join(directory, name) for name in ("vocab.json", "merges.txt")]
    missing = [p for p in paths if not os.path.exists(p)]
    if pad_token is _FROM_FOLDER:
      pad_token = checkpoint_pad_token(directory)
    fast = os.path.join(directory, "tokenizer.json")
    if missing and os.path.exists(fast):
      vocab, merges = read_tokenizer_json(fast)
      return cls(vocab, merges, context_length, pad_token)
    if missing:
      raise FileNotFoundError(f"no {' or '.join(missing)}: a CLIP tokenizer folder "
                              "holds vocab.json and merges.txt (or tokenizer.json)")
    with open(paths[0], encoding="utf-8") as f:
      vocab = json.load(f)
    return cls(vocab, read_merges(paths[1]), context_length, pad_token)

  @classmethod
  def load(cls, path: str, context_length: int) -> "ClipBpeTokenizer":
    """From a `clip_bpe.json` (as `save` writes) or a checkpoint's tokenizer
    folder."""
    if os.path.isdir(path):
      return cls.from_checkpoint(path, context_length)
    if not os.path.exists(path):
      raise FileNotFoundError(f"no CLIP tokenizer at {path}; convert the CLIP "
                              "checkpoint first or pass its tokenizer folder")
    with open(path, encoding="utf-8") as f:
      data = json.load(f)
    if data.get("format") != _FORMAT:
      raise ValueError(f"{path} is not a {_FORMAT} tokenizer file")
    return cls(data["vocab"], data["merges"], context_length, data["pad_token"])

  @property
  def serialized(self) -> bytes:
    """The bytes `save` writes: equal for equal tokenizers."""
    return json.dumps({"format": _FORMAT, "pad_token": self.pad_token,
                       "vocab": self.vocab, "merges": self.merges},
                      ensure_ascii=False).encode("utf-8")

  def save(self, path: str) -> None:
    """Writes `path` whole or not at all: a write killed midway leaves only
    `partial_path(path)`."""
    partial = partial_path(path)
    with open(partial, "wb") as f:
      f.write(self.serialized)
      f.flush()
      os.fsync(f.fileno())
    os.replace(partial, path)

  def with_context(self, context_length: int) -> "ClipBpeTokenizer":
    """The same tokenizer at another context (sharing the built BPE)."""
    if context_length < 3:
      raise ValueError(f"context_length={context_length}: needs at least 3")
    other = copy.copy(self)
    other.context_length = context_length
    return other

  @property
  def vocab_size(self) -> int:
    return self._tokenizer.get_vocab_size(with_added_tokens=True)

  def pieces(self, texts: Sequence[str]) -> list[list[int]]:
    """The BPE ids of each caption, without start and end tokens."""
    return [e.ids for e in self._tokenizer.encode_batch(
        list(texts), add_special_tokens=False)]

  def encode(self, texts: Sequence[str]) -> np.ndarray:
    """[N] strings -> int32 [N, context_length]."""
    if isinstance(texts, str):
      raise TypeError("encode takes a list of captions, not one string")
    out = np.full((len(texts), self.context_length), self.pad_id, np.int32)
    room = self.context_length - 2
    truncated = 0
    for row, ids in enumerate(self.pieces(texts)):
      if len(ids) > room:
        truncated += 1
        ids = ids[:room]
      out[row, 0] = self.start_id
      out[row, 1:len(ids) + 1] = ids
      out[row, len(ids) + 1] = self.end_id
    if truncated:
      log.warning("%d of %d captions are longer than the context of %d tokens "
                  "and were truncated", truncated, len(texts), self.context_length)
    return out

  def text_mask(self, tokens) -> np.ndarray:
    """bool [N, L]: True up to and including each row's first end token."""
    return text_mask(tokens, self.pad_id, self.end_id)

  def decode(self, tokens: np.ndarray) -> list[str]:
    """int [N, L] -> captions, stopping at the end token."""
    texts = []
    for row in np.asarray(tokens).tolist():
      ids = row[:row.index(self.end_id)] if self.end_id in row else row
      ids = [i for i in ids if i != self.start_id]
      text = self._tokenizer.decode(ids, skip_special_tokens=False)
      texts.append(text.replace(END_OF_WORD, " ").strip())
    return texts
