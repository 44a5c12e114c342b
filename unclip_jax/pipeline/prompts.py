"""Prompts -> caption tokens, with a one-line warning for what a user should
know: an empty prompt (sampled unconditionally), a prompt longer than a stage
reads (truncated), characters the tokenizer never saw (read as unknown)."""
import dataclasses
import logging
from typing import Sequence

import numpy as np

from unclip_jax.data.tokenizer import EOS_ID, PAD_ID, UNK_ID, Tokenizer
from unclip_jax.errors import UserError

log = logging.getLogger(__name__)

_MEASURE_CONTEXT = 4096  # long enough to count any prompt's tokens


@dataclasses.dataclass(frozen=True)
class EncodedPrompts:
  tokens: np.ndarray  # int32 [N, CLIP context], right-padded, each ending in EOS
  unconditional: np.ndarray  # bool [N]: empty prompts, sampled without a caption


def check_prompts(prompts: str | Sequence[str]) -> list[str]:
  """A list of prompt strings (one string is one prompt)."""
  if isinstance(prompts, str):
    prompts = [prompts]
  prompts = list(prompts)
  if not prompts:
    raise UserError("no prompts given; pass at least one (an empty string "
                    "samples unconditionally)")
  for prompt in prompts:
    if not isinstance(prompt, str):
      raise UserError(f"prompts must be strings; got {type(prompt).__name__} "
                      f"{prompt!r}")
  return prompts


def _short(prompt: str, limit: int = 40) -> str:
  return repr(prompt if len(prompt) <= limit else prompt[:limit - 3] + "...")


def encode_prompts(tokenizer: Tokenizer, prompts: Sequence[str],
                   readers: dict[str, int]) -> EncodedPrompts:
  """Tokens of `prompts` at the tokenizer's context (truncated like
  Tokenizer.encode: the first context - 1 pieces, then the end token).

  `readers`: the caption tokens each stage reads (e.g. {"CLIP": 77, "the
  decoder": 64}), named in the truncation warning.
  """
  context = tokenizer.context_length
  measure = Tokenizer(tokenizer.model_proto, _MEASURE_CONTEXT)
  full = measure.encode(list(prompts))
  lengths = (full != PAD_ID).sum(axis=1)  # pieces + the end token
  tokens = full[:, :context].copy()
  tokens[lengths > context, context - 1] = EOS_ID
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
    if UNK_ID in row:
      unknown = sorted({c for c in prompt if not c.isspace()
                        and UNK_ID in measure.encode([c])[0]})
      log.warning("prompt %s has characters the tokenizer never saw (%s); they "
                  "are read as unknown", _short(prompt), " ".join(unknown) or "?")
  return EncodedPrompts(tokens=tokens.astype(np.int32), unconditional=unconditional)
