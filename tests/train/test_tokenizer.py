"""The sentencepiece tokenizer: round trip, padding, end token, truncation."""
import logging

import numpy as np
import pytest

from unclip_jax.data.tokenizer import EOS_ID, PAD_ID, Tokenizer

CAPTIONS = [f"{name} on a {color} background in the {position}"
            for name in ("red apple", "grinning face", "rocket", "dog face")
            for color in ("red", "blue", "green", "white")
            for position in ("top left", "bottom right", "center")]


@pytest.fixture(scope="module")
def tokenizer():
  return Tokenizer.train(CAPTIONS, vocab_size=128, context_length=16)


def test_round_trip(tokenizer):
  tokens = tokenizer.encode(CAPTIONS[:5])
  assert tokens.shape == (5, 16) and tokens.dtype == np.int32
  assert tokenizer.decode(tokens) == CAPTIONS[:5]


def test_padding_and_end_token(tokenizer):
  tokens = tokenizer.encode(["rocket"])[0]
  end = int(np.argmax(tokens == EOS_ID))
  assert end >= 1 and (tokens[end + 1:] == PAD_ID).all()
  assert (tokens[:end] != PAD_ID).all()


def test_truncation_keeps_end_token_and_warns(tokenizer, caplog):
  long_caption = " ".join(CAPTIONS[:4])
  with caplog.at_level(logging.WARNING):
    tokens = tokenizer.encode([long_caption, "rocket"])
  assert tokens[0, -1] == EOS_ID and PAD_ID not in tokens[0]
  assert "1 of 2 captions are longer than the context" in caplog.text
  assert tokenizer.decode(tokens[:1])[0] in long_caption


def test_save_load_and_unknown_characters(tokenizer, tmp_path):
  path = str(tmp_path / "tokenizer.model")
  tokenizer.save(path)
  loaded = Tokenizer.load(path, context_length=16)
  np.testing.assert_array_equal(loaded.encode(CAPTIONS), tokenizer.encode(CAPTIONS))
  tokens = loaded.encode(["🍎 äpfel", ""])  # never raises; empty is just the end
  assert tokens[1, 0] == EOS_ID
  with pytest.raises(FileNotFoundError, match="train the clip stage first"):
    Tokenizer.load(str(tmp_path / "missing.model"), 16)
