"""What every generative model of the chain (prior, decoder, upsamplers) is: one
interface, one record of a trained one, the batch field names they share.

A generator is built from its stage's config and the sizes of the CLIP it reads
(`from_config(config, clip_sizes)`); it owns its module, noise schedule,
training loss and one compiled sampler. The trainer (stages/) adapts it to
data; the sampling pipeline only ever sees generators.
"""
import abc
import dataclasses
import json
import os
from typing import Any, Mapping

import flax.linen as nn
import jax
import ml_collections
import numpy as np

from unclip_jax.checkpoints.workdir import write_json_atomically

# Batch fields (the embedding cache stores the CLIP ones under these names).
IMAGE = "image"  # float32 [B, R, R, 3] in [-1, 1] (uint8 as stored)
IMAGE_EMBEDDING = "image_embedding"  # float32 [B, embed_dim], unit norm (CLIP z_i)
TEXT_EMBEDDING = "text_embedding"  # float32 [B, embed_dim], unit norm (CLIP z_t)
TEXT_ENCODINGS = "text_encodings"  # float16 [B, context_length, text_width]
TOKENS = "tokens"  # int32 [B, context_length]
TEXT_MASK = "text_mask"  # bool [B, context_length], True at real tokens
LOW_RES = "low_res"  # float32 [B, r, r, 3] in [-1, 1]: an upsampler's input
# The CLIP text tower's outputs for the empty caption, per row: what Karlo's stages
# condition on for classifier-free guidance (ours learn a null embedding instead).
NULL_TEXT_EMBEDDING = "null_text_embedding"
NULL_TEXT_ENCODINGS = "null_text_encodings"
NULL_TEXT_MASK = "null_text_mask"

Batch = Mapping[str, Any]


@dataclasses.dataclass(frozen=True)
class ClipSizes:
  """What a generator needs to know of the CLIP it reads.

  `image_embedding_mean` / `_std` (float [embed_dim]): statistics of the CLIP's
  image embeddings over the training data, which the prior standardises by;
  None where no data was read (then unit statistics: compile, bench).
  """
  embed_dim: int
  text_width: int
  context_length: int
  vocab_size: int
  resolution: int
  image_embedding_mean: tuple[float, ...] | None = None
  image_embedding_std: tuple[float, ...] | None = None

  @classmethod
  def from_config(cls, clip_config: ml_collections.ConfigDict) -> "ClipSizes":
    """The sizes a CLIP config describes (no statistics)."""
    return cls(embed_dim=clip_config.model.embed_dim,
               text_width=clip_config.model.text_width,
               context_length=clip_config.tokenizer.context_length,
               vocab_size=int(clip_config.tokenizer.vocab_size),
               resolution=clip_config.data.resolution)

  @classmethod
  def from_record(cls, record: Mapping[str, Any]) -> "ClipSizes":
    """From the frozen_clip.json a prior or decoder run wrote."""
    fields = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: (tuple(v) if isinstance(v, list) else v)
                  for k, v in record.items() if k in fields})

  def image_embedding_stats(self) -> tuple[np.ndarray, np.ndarray]:
    """(mean, std) float32 [embed_dim]; unit statistics when unknown."""
    if self.image_embedding_mean is None:
      return (np.zeros(self.embed_dim, np.float32),
              np.ones(self.embed_dim, np.float32))
    return (np.asarray(self.image_embedding_mean, np.float32),
            np.asarray(self.image_embedding_std, np.float32))


EPS_MOMENTS_FILENAME = "eps_moments.json"


@dataclasses.dataclass(frozen=True)
class EpsMoments:
  """Analytic-DPM's Gamma_t = E||eps_theta(x_t, t)||^2 / d of a trained model,
  at a grid of ORIGINAL timesteps (evenly spaced over the training schedule,
  both ends kept), estimated once at the end of training.

  `at(timesteps)` interpolates linearly in t, so one stored grid serves any
  respacing: an approximation between grid points (Gamma is smooth in t; the
  grid's ends are t = 0 and T - 1, so nothing is extrapolated).
  """
  timesteps: tuple[int, ...]  # original timesteps, increasing
  values: tuple[float, ...]  # Gamma at each
  step: int = 0  # the checkpoint step it was estimated with
  num_examples: int = 0  # held-out examples averaged over

  def at(self, timesteps: np.ndarray) -> np.ndarray:
    """Gamma float32 [K] at original `timesteps` [K]."""
    return np.interp(np.asarray(timesteps, np.float64), self.timesteps,
                     self.values).astype(np.float32)

  def write(self, workdir: str) -> str:
    """workdir/eps_moments.json, atomically (tmp then os.replace)."""
    path = os.path.join(workdir, EPS_MOMENTS_FILENAME)
    write_json_atomically(path, {
        "timesteps": [int(t) for t in self.timesteps],
        "eps_moments": [float(v) for v in self.values],
        "step": int(self.step), "num_examples": int(self.num_examples)})
    return path

  @classmethod
  def read(cls, workdir: str) -> "EpsMoments | None":
    """The moments a finished training run wrote in `workdir`; None if none."""
    path = os.path.join(workdir, EPS_MOMENTS_FILENAME)
    if not os.path.exists(path):
      return None
    with open(path) as f:
      record = json.load(f)
    return cls(tuple(record["timesteps"]), tuple(record["eps_moments"]),
               record.get("step", 0), record.get("num_examples", 0))


def abstract_params(init_params, rng: jax.Array | None = None) -> Any:
  """ShapeDtypeStructs of the params `init_params(rng)` would make, without the
  logical-axis boxes. Taken off by hand, not with nn.unbox: unboxing applies
  sharding constraints, which fail under a caller's (e.g. the trainer's
  multi-host) mesh."""
  boxed = jax.eval_shape(init_params, jax.random.key(0) if rng is None else rng)
  return jax.tree.map(lambda x: getattr(x, "value", x), boxed,
                      is_leaf=lambda x: isinstance(x, nn.meta.AxisMetadata))


class Generator(abc.ABC):
  """A generative stage's model: built from config, trained by `losses`, sampled
  by `sample` (one compiled function per shapes and static options)."""

  config: ml_collections.ConfigDict
  # How the sampling chain conditions this generator (the pipeline asks, so
  # that converted stages of other designs run through it unchanged):
  # the text embedding z_t L2-normalised (ours) or as the CLIP projects it;
  unit_norm_text_embedding: bool = True
  # the image embedding z_i it decodes unit-norm (ours) or as the prior made it;
  unit_norm_image_embedding: bool = True
  # the batch fields a decoder's `sample` reads besides `image_embedding`.
  caption_fields: tuple[str, ...] = (TOKENS,)
  # What sampler='analytic' reads (`generators.load` sets it from the workdir's
  # eps_moments.json); None until a training run has estimated it.
  eps_moments: EpsMoments | None = None

  @classmethod
  @abc.abstractmethod
  def from_config(cls, config: ml_collections.ConfigDict,
                  clip_sizes: ClipSizes | None) -> "Generator":
    """Checks `config` (one-line ConfigError) and builds the generator."""

  @abc.abstractmethod
  def init_params(self, rng: jax.Array) -> Any:
    """Params boxed with logical axis names (traced under jax.eval_shape)."""

  @abc.abstractmethod
  def losses(self, params: Any, batch: Batch, rng: jax.Array, *,
             train: bool = True) -> tuple[jax.Array, dict[str, jax.Array]]:
    """(per-example loss [B], per-example aux [B] arrays) on a GLOBAL batch.
    `train=False` (held-out loss): nothing dropped, no dropout."""

  @abc.abstractmethod
  def sample(self, params: Any, conditioning: Batch, rng: jax.Array, *,
             num_steps: int | None = None, guidance_scale: float | None = None,
             x_T: jax.Array | None = None, **options) -> jax.Array:
    """Samples for `conditioning` (batch fields without the target); options
    left None take the config's `sample.*` values."""

  @abc.abstractmethod
  def abstract_batch(self, batch_size: int) -> dict[str, jax.ShapeDtypeStruct]:
    """The training batch as the data pipeline delivers it, without data."""

  def estimate_eps_moments(self, params: Any, batch: Batch, rng: jax.Array, *,
                           grid_size: int) -> jax.Array:
    """Gamma float32 [grid_size] of the conditional model (no guidance) on a
    batch of held-out data, at `common.moments_grid(T, grid_size)`."""
    raise NotImplementedError(f"{type(self).__name__} has no eps moments")


@dataclasses.dataclass(frozen=True)
class Trained:
  """A generator read from its workdir, with its EMA params."""
  config: ml_collections.ConfigDict
  generator: Generator
  params: Any  # EMA params
  step: int
  workdir: str
  clip_sizes: ClipSizes | None  # None for stages that read no CLIP
  clip_fingerprint: str | None  # the exact CLIP checkpoint it was trained on
  eps_moments: EpsMoments | None = None  # from eps_moments.json, if written
