"""The CLIP the generators condition on: its module from config, and a trained one
frozen (`FrozenClip`): tokenizer, jitted encoders, sizes and a fingerprint naming
the exact checkpoint, which caches of CLIP outputs are keyed by."""
import functools
import hashlib
import json
import logging
import os
from typing import Any

import flax.linen as nn
import jax
import ml_collections
import numpy as np

from unclip_jax.checkpoints.workdir import StageWorkdir
from unclip_jax.data.tokenizer import FILENAME as TOKENIZER_FILENAME
from unclip_jax.data.tokenizer import PAD_ID, Tokenizer
from unclip_jax.generators.base import ClipSizes, abstract_params
from unclip_jax.models.clip import CLIP
from unclip_jax.models.precision import DTYPES
from unclip_jax.parallel.local import (local_mesh, local_replicated_sharding,
                                       put_local_rows)

log = logging.getLogger(__name__)


def build_clip(config: ml_collections.ConfigDict,
               vocab_size: int | None = None) -> CLIP:
  """The CLIP module a config describes."""
  m = config.model
  return CLIP(
      embed_dim=m.embed_dim, image_size=config.data.resolution,
      patch_size=m.patch_size, vision_width=m.vision_width,
      vision_depth=m.vision_depth, vision_heads=m.vision_heads,
      text_width=m.text_width, text_depth=m.text_depth,
      text_heads=m.text_heads,
      vocab_size=vocab_size or config.tokenizer.vocab_size,
      context_length=config.tokenizer.context_length, mlp_ratio=m.mlp_ratio,
      dtype=DTYPES[config.dtype], remat_policy=m.remat_policy,
      scan_layers=m.scan_layers)


def config_hash(config: ml_collections.ConfigDict) -> str:
  text = json.dumps(config.to_dict(), sort_keys=True, default=str)
  return hashlib.sha256(text.encode()).hexdigest()[:12]


class FrozenClip:
  """A trained CLIP, read from its workdir, with jitted encoders.

  The config, tokenizer and checkpoint step are read at once; the params only on the
  first encode, so code that needs just the `fingerprint` (a cache hit) never loads
  them. Encoders run on this host's devices: params replicated, the batch split over
  the devices when it divides evenly.
  """

  def __init__(self, workdir: str, step: int | None = None):
    self._workdir = StageWorkdir(workdir, "clip")
    self.workdir = self._workdir.path
    self.config = self._workdir.config
    self.step = self._workdir.step(step)
    self.tokenizer = Tokenizer.load(
        os.path.join(self.workdir, TOKENIZER_FILENAME),
        self.config.tokenizer.context_length)
    self.model = build_clip(self.config)
    # Path + step + when that step was written + the config: a CLIP retrained in the
    # same workdir, even to the same step, gets a new fingerprint.
    self.fingerprint = (f"{self.workdir}@{self.step}:"
                        f"{self._workdir.commit_time(self.step)}:"
                        f"{config_hash(self.config)}")

  @property
  def sizes(self) -> ClipSizes:
    return ClipSizes.from_config(self.config)

  @property
  def embed_dim(self) -> int:
    return self.config.model.embed_dim

  @property
  def text_width(self) -> int:
    return self.config.model.text_width

  @property
  def context_length(self) -> int:
    return self.config.tokenizer.context_length

  @property
  def resolution(self) -> int:
    return self.config.data.resolution

  @property
  def vocab_size(self) -> int:
    """Token ids a model reading this CLIP's tokens must embed: the tokenizer's
    configured vocabulary (an upper bound of the trained one)."""
    return int(self.config.tokenizer.vocab_size)

  def abstract_params(self) -> Any:
    return abstract_params(self._init)

  def _init(self, rng):
    side, context = self.resolution, self.context_length
    return self.model.init(rng, np.zeros((1, side, side, 3), np.float32),
                           np.zeros((1, context), np.int32))["params"]

  @functools.cached_property
  def params(self) -> Any:
    log.info("loading CLIP step %d from %s", self.step, self.workdir)
    return self._workdir.restore_ema_params(self.step, local_replicated_sharding(),
                                            expected=self.abstract_params())

  def _jit_method(self, method: str):
    def apply(params, inputs):
      # No logical axis rules: a caller's mesh context (the trainer's) must not
      # constrain activations of a model whose params live on this host's devices.
      with nn.logical_axis_rules(()):
        return self.model.apply({"params": params}, inputs, method=method)
    jitted = jax.jit(apply)

    def on_this_host(params, inputs):
      # The trainer's mesh spans every process's devices; this runs on ours only.
      with jax.set_mesh(local_mesh()):
        return jitted(params, inputs)
    return on_this_host

  @functools.cached_property
  def _encode_text(self):
    return self._jit_method("encode_text")

  @functools.cached_property
  def _encode_image(self):
    return self._jit_method("encode_image")

  def tokenize(self, captions: list[str]) -> np.ndarray:
    """[N] captions -> int32 [N, context_length], right-padded."""
    return self.tokenizer.encode(list(captions))

  @staticmethod
  def text_mask(tokens) -> np.ndarray:
    """bool [N, context_length]: True at real tokens (the end token included)."""
    return np.asarray(tokens) != PAD_ID

  def encode_text(self, tokens) -> tuple[jax.Array, jax.Array]:
    """int32 [B, L] -> (z_t [B, embed_dim] unit-norm, token encodings
    [B, L, text_width]), float32."""
    return self._encode_text(self.params, put_local_rows(tokens))

  def encode_image(self, images) -> jax.Array:
    """float [B, H, W, 3] in [-1, 1] -> z_i [B, embed_dim] unit-norm float32."""
    return self._encode_image(self.params,
                              put_local_rows(np.asarray(images, np.float32)))

  def __repr__(self) -> str:
    return f"FrozenClip({self.fingerprint})"
