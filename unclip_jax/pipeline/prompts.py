"""Prompts -> caption tokens, with a one-line warning for what a user should
know: an empty prompt (sampled unconditionally), a prompt longer than a stage
reads (truncated), characters the tokenizer never saw (read as unknown)."""
import dataclasses
import logging
import unicodedata
from typing import Sequence

import emoji
import numpy as np

from unclip_jax.data.tokenizer import Tokenizer
from unclip_jax.errors import UserError

log = logging.getLogger(__name__)

_MEASURE_CONTEXT = 4096  # long enough to count any prompt's tokens
# Far more than any stage reads (CLIP: 77 tokens in the paper); a longer
# prompt is a file pasted by mistake.
MAX_PROMPT_CHARACTERS = 2000


@dataclasses.dataclass(frozen=True)
class EncodedPrompts:
  tokens: np.ndarray  # int32 [N, CLIP context], right-padded, each with its end token
  unconditional: np.ndarray  # bool [N]: empty prompts, sampled without a caption


def check_prompts(prompts: str | Sequence[str]) -> list[str]:
  """A list of prompt strings (one string is one prompt), each checked to be
  text a stage can read: no control characters, not absurdly long."""
  if isinstance(prompts, (bytes, bytearray)):
    raise UserError("prompts must be str, not bytes; decode them first, e.g. "
                    "prompt.decode('utf-8')")
  if isinstance(prompts, str):
    prompts = [prompts]
  try:
    prompts = list(prompts)
  except TypeError:
    raise UserError(f"prompts must be a string or a list of strings; got "
                    f"{type(prompts).__name__}") from None
  if not prompts:
    raise UserError("no prompts given; pass at least one (an empty string "
                    "samples unconditionally)")
  for prompt in prompts:
    _check_prompt(prompt)
  return prompts


def _check_prompt(prompt) -> None:
  if isinstance(prompt, (bytes, bytearray)):
    raise UserError(f"prompts must be str, not bytes ({_short(prompt)}); decode "
                    "them first, e.g. prompt.decode('utf-8')")
  if not isinstance(prompt, str):
    raise UserError(f"prompts must be strings; got {type(prompt).__name__} "
                    f"{prompt!r}")
  if len(prompt) > MAX_PROMPT_CHARACTERS:
    raise UserError(f"prompt {_short(prompt)} is {len(prompt)} characters long; "
                    "the stages read only its first few dozen tokens: shorten it "
                    f"to at most {MAX_PROMPT_CHARACTERS} characters")
  for character in prompt:
    # Cc: control characters (an escape sequence, a NUL); Cs: half of a
    # surrogate pair, which is no text at all. Tabs and newlines are spaces.
    kind = {"Cc": "the control character", "Cs": "a lone surrogate (no text)"
            }.get(unicodedata.category(character))
    if kind and character not in "\t\n\r":
      raise UserError(f"prompt {_short(prompt)} contains {kind} "
                      f"U+{ord(character):04X}; remove it (tabs and newlines "
                      "are fine)")


def _short(prompt: str, limit: int = 40) -> str:
  return repr(prompt if len(prompt) <= limit else prompt[:limit - 3] + "...")


def _in_words(prompt: str) -> str:
  """' (🍎 is "red apple")' for the emoji in a prompt: what to write instead."""
  found = dict.fromkeys(match["emoji"] for match in emoji.emoji_list(prompt))
  names = [f"{e} is {_emoji_name(e)!r}" for e in list(found)[:3]]
  return f" ({', '.join(names)})" if names else ""


def _emoji_name(character: str) -> str:
  return emoji.EMOJI_DATA[character]["en"].strip(":").replace("_", " ")


def encode_prompts(tokenizer: Tokenizer, prompts: Sequence[str],
                   readers: dict[str, int]) -> EncodedPrompts:
  """Tokens of `prompts` at the tokenizer's context (truncated like
  Tokenizer.encode: the first context - 1 pieces, then the end token).

  `readers`: the caption tokens each stage reads (e.g. {"CLIP": 77, "the
  decoder": 64}), named in the truncation warning.
  """
  context = tokenizer.context_length
  measure = tokenizer.with_context(_MEASURE_CONTEXT)
  full = measure.encode(list(prompts))
  # Pieces + the end token (+ the start token of CLIP's BPE).
  lengths = measure.text_mask(full).sum(axis=1)
  tokens = full[:, :context].copy()
  tokens[lengths > context, context - 1] = tokenizer.end_id
  unconditional = np.asarray([not p.strip() for p in prompts])
  for prompt, length, row, empty in zip(prompts, lengths, full, unconditional):
    if empty:
      log.warning("prompt %r is empty: sampling unconditionally (the prior's and "
                  "the decoder's caption-dropped branch)", prompt)
      continue
    cut = {name: read for name, read in readers.items() if length > read}
    if cut:
      reads = ", ".join(f"{name} the first {read}" for name, read in
                        sorted(cut.items(), key=lambda item: item[1]))
      log.warning("prompt %s is %d tokens long, so it is truncated: %s",
                  _short(prompt), length, reads)
    unk_id = tokenizer.unk_id  # None: a byte-level BPE has no unknown pieces
    if unk_id is not None and unk_id in row:
      characters = {c for c in prompt if not c.isspace()}
      unknown = sorted(c for c in characters if unk_id in measure.encode([c])[0])
      if len(unknown) == len(characters):
        raise UserError(
            f"prompt {_short(prompt)} has no character the tokenizer knows, so "
            f"every stage would read it as unknown tokens; describe it in words"
            f"{_in_words(prompt)}")
      log.warning("prompt %s has characters the tokenizer never saw (%s); they "
                  "are read as unknown%s", _short(prompt), " ".join(unknown),
                  _in_words(prompt))
  return EncodedPrompts(tokens=tokens.astype(np.int32), unconditional=unconditional)
