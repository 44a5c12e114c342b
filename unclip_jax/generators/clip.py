"""The CLIP the generators condition on: its module from config, and a trained one
frozen (`FrozenClip`): tokenizer, jitted encoders, sizes and a fingerprint naming
the exact checkpoint, which caches of CLIP outputs are keyed by."""
import functools
import hashlib
import json
import logging
from typing import Any

import flax.linen as nn
import jax
import ml_collections
import numpy as np

from unclip_jax import xla_options
from unclip_jax.checkpoints.workdir import StageWorkdir
from unclip_jax.data.tokenizer import load_tokenizer
from unclip_jax.errors import ConfigError
from unclip_jax.generators.base import ClipSizes, abstract_params
from unclip_jax.models.clip import CLIP, TEXT_ONLY_HELP
from unclip_jax.models.precision import DTYPES
from unclip_jax.models.text import POOLINGS
from unclip_jax.models.transformer import ACTIVATIONS
from unclip_jax.parallel.local import (local_mesh, local_replicated_sharding,
                                       put_local_rows)

log = logging.getLogger(__name__)


def _triple(value) -> tuple[float, ...] | None:
  """An RGB triple of the config (a list once read back from JSON)."""
  return None if value is None else tuple(float(v) for v in value)


def build_clip(config: ml_collections.ConfigDict,
               vocab_size: int | None = None) -> CLIP:
  """The CLIP module a config describes. Fields added for converted checkpoints
  are read with their defaults, so configs saved before them build the same
  model."""
  m = config.model
  pooling = m.get("text_pooling", "last_non_pad")
  key_padding_mask = m.get("text_key_padding_mask", True)
  activation = m.get("activation", "gelu")
  if pooling not in POOLINGS:
    raise ConfigError(f"model.text_pooling={pooling!r} is none of "
                      f"{', '.join(POOLINGS)}; set --config.model.text_pooling")
  if activation not in ACTIVATIONS:
    raise ConfigError(f"model.activation={activation!r} is none of "
                      f"{', '.join(ACTIVATIONS)}; set --config.model.activation")
  if config.tokenizer.get("kind", "sentencepiece") == "clip_bpe" and (
      pooling == "last_non_pad" or key_padding_mask):
    raise ConfigError(
        "tokenizer.kind=clip_bpe reads CLIP checkpoints converted from OpenAI, "
        "open_clip or transformers, whose text tower pools at the end token and "
        "has no key padding mask: set --config.model.text_pooling=first_end (or "
        "argmax) and --config.model.text_key_padding_mask=False")
  return CLIP(
      embed_dim=m.embed_dim, image_size=config.data.resolution,
      patch_size=m.patch_size, vision_width=m.vision_width,
      vision_depth=m.vision_depth, vision_heads=m.vision_heads,
      text_width=m.text_width, text_depth=m.text_depth,
      text_heads=m.text_heads,
      vocab_size=vocab_size or config.tokenizer.vocab_size,
      context_length=config.tokenizer.context_length, mlp_ratio=m.mlp_ratio,
      dtype=DTYPES[config.dtype], remat_policy=m.remat_policy,
      scan_layers=m.scan_layers, activation=activation,
      layer_norm_eps=m.get("layer_norm_eps", 1e-5),
      vision_mlp_ratio=m.get("vision_mlp_ratio"),
      text_mlp_ratio=m.get("text_mlp_ratio"), text_pooling=pooling,
      end_id=m.get("end_id", 2), text_key_padding_mask=key_padding_mask,
      image_mean=_triple(m.get("image_mean")),
      image_std=_triple(m.get("image_std")))


def init_clip_params(model: CLIP, rng, resolution: int, context_length: int):
  """`model.init(...)["params"]` on zero inputs: both towers, or the text tower
  alone for a text-only CLIP."""
  tokens = np.zeros((1, context_length), np.int32)
  if not model.has_image_tower:
    return model.init(rng, tokens, method=CLIP.text_features)["params"]
  images = np.zeros((1, resolution, resolution, 3), np.float32)
  return model.init(rng, images, tokens)["params"]


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
    self.tokenizer = load_tokenizer(self.workdir, self.config.tokenizer)
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
    return init_clip_params(self.model, rng, self.resolution, self.context_length)

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
    jitted = xla_options.jit(apply)

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

  @functools.cached_property
  def _text_features(self):
    return self._jit_method("text_features")

  @functools.cached_property
  def _image_features(self):
    return self._jit_method("image_features")

  def tokenize(self, captions: list[str]) -> np.ndarray:
    """[N] captions -> int32 [N, context_length], right-padded."""
    return self.tokenizer.encode(list(captions))

  def text_mask(self, tokens) -> np.ndarray:
    """bool [N, context_length]: True at real tokens, up to and including the
    end token (also where the tokenizer pads with its end token)."""
    return self.tokenizer.text_mask(tokens)

  def encode_text(self, tokens) -> tuple[jax.Array, jax.Array]:
    """int32 [B, L] -> (z_t [B, embed_dim] unit-norm, token encodings
    [B, L, text_width]), float32."""
    return self._encode_text(self.params, put_local_rows(tokens))

  def encode_image(self, images) -> jax.Array:
    """float [B, H, W, 3] in [-1, 1] -> z_i [B, embed_dim] unit-norm float32."""
    self._require_image_tower()
    return self._encode_image(self.params,
                              put_local_rows(np.asarray(images, np.float32)))

  def text_features(self, tokens) -> tuple[jax.Array, jax.Array]:
    """int32 [B, L] -> (projected pooled state [B, embed_dim], not normalised;
    token encodings [B, L, text_width]), float32: what Karlo's prior and
    decoder read (transformers' text_embeds and last_hidden_state)."""
    return self._text_features(self.params, put_local_rows(tokens))

  def image_features(self, images) -> jax.Array:
    """float [B, H, W, 3] in [-1, 1] -> the projected image state [B, embed_dim]
    float32, not normalised (transformers' image_embeds)."""
    self._require_image_tower()
    return self._image_features(self.params,
                                put_local_rows(np.asarray(images, np.float32)))

  def _require_image_tower(self) -> None:
    # Before the params load or anything compiles.
    if not self.model.has_image_tower:
      raise ConfigError(TEXT_ONLY_HELP)

  def record(self, **extra) -> dict:
    """What a prior or decoder keeps of the CLIP it reads (frozen_clip.json): its
    fingerprint, workdir, step and sizes, + `extra`."""
    return {"fingerprint": self.fingerprint, "workdir": self.workdir,
            "step": self.step, "embed_dim": self.embed_dim,
            "text_width": self.text_width, "vocab_size": self.vocab_size,
            "context_length": self.context_length, "resolution": self.resolution,
            **extra}

  def __repr__(self) -> str:
    return f"FrozenClip({self.fingerprint})"
