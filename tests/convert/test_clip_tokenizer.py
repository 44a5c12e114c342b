"""CLIP's byte-level BPE (data/clip_bpe.py) gives transformers' CLIPTokenizer ids.

No download: the test learns a small CLIP-format vocabulary (the 256 byte
symbols, the same with "</w>", some 130 merges, the two special tokens) on
a few sentences, writes vocab.json + merges.txt, and compares our ids with
transformers' CLIPTokenizer (tokenizers-backed; transformers 5 has no separate
python CLIP tokenizer) and with a plain-python BPE written here from the
algorithm's description, on captions with punctuation, digits, contractions,
accents, emoji, CJK and more pieces than the context holds.
"""
import collections
import json
import unicodedata

import numpy as np
import pytest

from unclip_jax.data.clip_bpe import (END_TOKEN, SPLIT_PATTERN, START_TOKEN,
                                      ClipBpeTokenizer)
from unclip_jax.data.tokenizer import load_tokenizer, text_mask

# The plain-python reference splits with the `regex` module (\p{L} classes).
regex = pytest.importorskip("regex")

CONTEXT = 24
CORPUS = [
    "a photo of a cat sitting on the red sofa, next to two dogs.",
    "The quick brown fox jumps over the lazy dog!!! It's 2024 and we're here.",
    "une crème brûlée très délicieuse; über den Wolken, müssen wir sein",
    "there's a cat, a dog and another cat; they'll play with the ball",
    "photos of cats and dogs: 3 cats, 12 dogs -- what a party :)",
]
CAPTIONS = [
    "A photo of a cat.",
    "It's a DOG's life; they'll say we've   won, I'd think\tyou're\nright",
    "Numbers: 3.14159, 2024 and 1,000,000!",
    "crème brûlée über naïve café",
    "emoji 🐱🐶 and 🍎 on the table 👍🏽",
    "中文 日本語のテキスト 한국어",
    "punctuation!?... (brackets) [square] {curly} <angle> \"quotes\" 'single'",
    "",
    "   leading and trailing spaces   ",
    "a very long caption " * 12,
    "x" * 200,
    "\u0065\u0301 decomposed accent and composed é",
]


def _bytes_to_symbols() -> dict[int, str]:
  """Byte -> the printable character byte-level BPE stands it for: printable
  Latin-1 bytes are themselves, the others the next unused code points from
  256 on, in byte order."""
  printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
               *range(ord("®"), ord("ÿ") + 1)]
  symbols, extra = {}, 0
  for byte in range(256):
    if byte in printable:
      symbols[byte] = chr(byte)
    else:
      symbols[byte] = chr(256 + extra)
      extra += 1
  return symbols


BYTE_SYMBOLS = _bytes_to_symbols()


def _normalize(text: str) -> str:
  return regex.sub(r"\s+", " ", unicodedata.normalize("NFC", text)).lower()


def _words(text: str) -> list[tuple[str, ...]]:
  """Each pre-tokenized word as byte symbols, the last one marked "</w>"."""
  words = []
  for word in regex.findall(SPLIT_PATTERN, _normalize(text)):
    symbols = [BYTE_SYMBOLS[b] for b in word.encode("utf-8")]
    words.append(tuple(symbols[:-1]) + (symbols[-1] + "</w>",))
  return words


def _learn_merges(corpus: list[str], count: int) -> list[tuple[str, str]]:
  """The `count` most frequent-pair merges over the corpus' words."""
  words = collections.Counter(w for text in corpus for w in _words(text))
  merges = []
  for _ in range(count):
    pairs = collections.Counter()
    for word, n in words.items():
      for pair in zip(word, word[1:]):
        pairs[pair] += n
    if not pairs:
      break
    best = max(pairs, key=lambda p: (pairs[p], p))
    merges.append(best)
    words = collections.Counter({_merge(w, best): n for w, n in words.items()})
  return merges


def _merge(word: tuple[str, ...], pair: tuple[str, str]) -> tuple[str, ...]:
  out, i = [], 0
  while i < len(word):
    if i + 1 < len(word) and (word[i], word[i + 1]) == pair:
      out.append(word[i] + word[i + 1])
      i += 2
    else:
      out.append(word[i])
      i += 1
  return tuple(out)


def _reference_encode(text: str, vocab: dict, ranks: dict, pad_id: int
                      ) -> list[int]:
  """Plain-python CLIP BPE: merge the lowest-ranked adjacent pair until none
  is in the merges; start + pieces (truncated) + end, padded."""
  ids = []
  for word in _words(text):
    while len(word) > 1:
      pair = min(zip(word, word[1:]), key=lambda p: ranks.get(p, float("inf")))
      if pair not in ranks:
        break
      word = _merge(word, pair)
    ids.extend(vocab[symbol] for symbol in word)
  ids = [vocab[START_TOKEN]] + ids[:CONTEXT - 2] + [vocab[END_TOKEN]]
  return ids + [pad_id] * (CONTEXT - len(ids))


def write_clip_vocab(directory) -> tuple[dict, dict]:
  """Writes a CLIP-format vocab.json + merges.txt learnt on CORPUS into
  `directory` (a pathlib.Path); returns (vocab, merge ranks)."""
  merges = _learn_merges(CORPUS, 300)
  base = [BYTE_SYMBOLS[b] for b in range(256)]
  tokens = base + [s + "</w>" for s in base] + [a + b for a, b in merges]
  tokens = list(dict.fromkeys(tokens)) + [START_TOKEN, END_TOKEN]
  vocab = {token: i for i, token in enumerate(tokens)}
  with open(directory / "vocab.json", "w", encoding="utf-8") as f:
    json.dump(vocab, f, ensure_ascii=False)
  with open(directory / "merges.txt", "w", encoding="utf-8") as f:
    f.write("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
  return vocab, {pair: rank for rank, pair in enumerate(merges)}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
  """A CLIP-format tokenizer folder: (directory, vocab, merge ranks)."""
  directory = tmp_path_factory.mktemp("clip_tokenizer")
  return (directory, *write_clip_vocab(directory))


def _with_pad(checkpoint, tmp_path, pad_token):
  """A transformers-style copy of the folder whose tokenizer_config.json names
  `pad_token`."""
  directory = tmp_path / "tokenizer"
  directory.mkdir()
  for name in ("vocab.json", "merges.txt"):
    (directory / name).write_bytes((checkpoint[0] / name).read_bytes())
  with open(directory / "tokenizer_config.json", "w") as f:
    json.dump({"pad_token": pad_token, "model_max_length": CONTEXT}, f)
  return directory


def test_merges_are_exercised(checkpoint):
  _, vocab, _ = checkpoint
  ours = ClipBpeTokenizer.from_checkpoint(str(checkpoint[0]), CONTEXT)
  ids = ours.pieces(["photo of cats"])[0]
  assert len(ids) == 3 and all(i >= 512 for i in ids)  # whole words, merged
  assert ours.vocab_size == len(vocab) > 512 + 100


@pytest.mark.parametrize("pad_token", [END_TOKEN, "!"])
def test_ids_equal_transformers(checkpoint, tmp_path, pad_token):
  transformers = pytest.importorskip("transformers")
  directory = _with_pad(checkpoint, tmp_path, pad_token)
  ours = ClipBpeTokenizer.from_checkpoint(str(directory), CONTEXT)
  theirs = transformers.CLIPTokenizer.from_pretrained(str(directory))
  assert transformers.CLIPTokenizerFast.from_pretrained(str(directory))(
      CAPTIONS[:2])["input_ids"] == theirs(CAPTIONS[:2])["input_ids"]
  captions = CAPTIONS + ["a <|endoftext|> inside", "wow!! ! x"]
  expected = theirs(captions, padding="max_length", max_length=CONTEXT,
                    truncation=True)
  tokens = ours.encode(captions)
  np.testing.assert_array_equal(tokens, np.asarray(expected["input_ids"]))
  assert ours.pad_id == checkpoint[1][pad_token]
  # The mask ends at the first end token (where the text tower pools), so a
  # caption that writes one out is left out of this comparison.
  np.testing.assert_array_equal(
      ours.text_mask(tokens)[:len(CAPTIONS)],
      np.asarray(expected["attention_mask"], bool)[:len(CAPTIONS)])


def test_ids_equal_plain_python_bpe(checkpoint):
  """An OpenAI / open_clip folder (no tokenizer config) pads with 0."""
  directory, vocab, ranks = checkpoint
  ours = ClipBpeTokenizer.from_checkpoint(str(directory), CONTEXT)
  assert ours.pad_id == 0
  expected = [_reference_encode(c, vocab, ranks, pad_id=0) for c in CAPTIONS]
  np.testing.assert_array_equal(ours.encode(CAPTIONS), np.asarray(expected))


def test_truncation_keeps_the_end_token(checkpoint):
  ours = ClipBpeTokenizer.from_checkpoint(str(checkpoint[0]), CONTEXT)
  tokens = ours.encode(["a very long caption " * 12])[0]
  assert tokens[0] == ours.start_id and tokens[-1] == ours.end_id
  assert ours.end_id not in tokens[:-1]


def test_text_mask_when_pad_is_the_end_token():
  end = 7
  tokens = np.array([[6, 1, 2, end, end, end], [6, end, end, end, end, end],
                     [6, 1, 2, 3, 4, end]])
  np.testing.assert_array_equal(text_mask(tokens, end, end), [
      [1, 1, 1, 1, 0, 0], [1, 1, 0, 0, 0, 0], [1, 1, 1, 1, 1, 1]])
  # Padding with 0: the same.
  zero_padded = np.where(text_mask(tokens, end, end), tokens, 0)
  np.testing.assert_array_equal(text_mask(zero_padded, 0, end),
                                text_mask(tokens, end, end))


def test_save_load_in_a_workdir(checkpoint, tmp_path):
  import ml_collections  # pylint: disable=import-outside-toplevel
  directory = _with_pad(checkpoint, tmp_path, END_TOKEN)
  ours = ClipBpeTokenizer.load(str(directory), CONTEXT)
  workdir = tmp_path / "workdir"
  workdir.mkdir()
  ours.save(str(workdir / ours.filename))
  config = ml_collections.ConfigDict(
      {"kind": "clip_bpe", "context_length": CONTEXT, "vocab_size": 1})
  loaded = load_tokenizer(str(workdir), config)
  assert isinstance(loaded, ClipBpeTokenizer)
  assert loaded.serialized == ours.serialized and loaded.pad_id == ours.pad_id
  np.testing.assert_array_equal(loaded.encode(CAPTIONS), ours.encode(CAPTIONS))
  assert loaded.decode(loaded.encode(["A Photo of a CAT!"])) == ["a photo of a cat !"]
  longer = loaded.with_context(64)
  assert longer.context_length == 64 and longer.serialized == ours.serialized


def test_prompts_encode_as_the_tokenizer_does(checkpoint, tmp_path):
  """The sampling pipeline's prompt encoding (measured at a long context, then
  cut) gives the tokenizer's own truncation, pad == end token included."""
  from unclip_jax.pipeline.prompts import encode_prompts  # pylint: disable=import-outside-toplevel
  ours = ClipBpeTokenizer.from_checkpoint(
      str(_with_pad(checkpoint, tmp_path, END_TOKEN)), CONTEXT)
  prompts = ["a very long caption " * 12, "a cat", "emoji 🐱"]
  encoded = encode_prompts(ours, prompts, {"CLIP": CONTEXT})
  np.testing.assert_array_equal(encoded.tokens, ours.encode(prompts))


def test_clip_bpe_needs_a_checkpoint_text_tower():
  """Our text tower's defaults (last non-pad pooling, key padding) are wrong
  where the pad id may be the end token: refused before anything compiles."""
  from configs import clip as clip_configs  # pylint: disable=import-outside-toplevel
  from unclip_jax.errors import ConfigError  # pylint: disable=import-outside-toplevel
  from unclip_jax.generators.clip import build_clip  # pylint: disable=import-outside-toplevel
  config = clip_configs.get_config("tiny")
  config.tokenizer.kind = "clip_bpe"
  with pytest.raises(ConfigError, match="text_pooling=first_end"):
    build_clip(config)
  config.model.update(text_pooling="first_end", text_key_padding_mask=False)
  assert build_clip(config).text_pooling == "first_end"
