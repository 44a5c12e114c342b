"""The diffusion prior stage: caption -> CLIP image embedding (DALL-E 2 §2.1).

A causal transformer (models/prior.py) over [caption token encodings, z_t, timestep,
noised z_i, query] predicts the clean z_i ('x0' parameterisation) with an MSE loss on
a 1000-step cosine schedule. The caption is replaced by learned null embeddings 10% of
the time, for classifier-free guidance. Sampling is DDIM over a respaced schedule;
N candidates are drawn per caption and the one with the highest z_i . z_t is kept.

The stage trains on frozen CLIP outputs computed once into an embedding cache
(embedding_cache.py); images are never seen after that. `DiffusionPrior` (the loss and
the one-call sampler) and `load_prior` are what the sampling pipeline reuses.
"""
import functools
import json
import logging
import math
import os
import shutil
from typing import Any, NamedTuple

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from unclip_jax import diffusion
from unclip_jax.data import pipeline
from unclip_jax.data.tokenizer import FILENAME as TOKENIZER_FILENAME
from unclip_jax.errors import ConfigError, WorkdirError
from unclip_jax.models.clip import l2_normalize
from unclip_jax.models.prior import PriorTransformer
from unclip_jax.stages import embedding_cache, frozen
from unclip_jax.stages.base import Stage
from unclip_jax.stages.clip import DTYPES
from unclip_jax.stages.embedding_cache import (IMAGE_EMBEDDING, TEXT_EMBEDDING,
                                               TEXT_ENCODINGS, TEXT_MASK)

log = logging.getLogger(__name__)

PARAMETERIZATION = "x0"  # the paper's prior predicts z_i itself, not the noise
MODEL_INPUTS = (IMAGE_EMBEDDING, TEXT_EMBEDDING, TEXT_ENCODINGS, TEXT_MASK)
# What the prior was trained on: the CLIP's fingerprint and sizes, z_i statistics.
FROZEN_CLIP_FILENAME = "frozen_clip.json"
_CLIP_HELP = ("a CLIP workdir, trained with python -m unclip_jax.train --config "
              "configs/clip.py:demo --workdir DIR")


def build_prior_model(config: ml_collections.ConfigDict, *, embed_dim: int,
                      text_width: int, context_length: int) -> PriorTransformer:
  """The PriorTransformer a prior config describes, on a CLIP of these sizes
  (`context_length`: the CLIP's; `model.text_context` may shorten it)."""
  m = config.model
  if m.get("text_context"):
    context_length = min(context_length, m.text_context)
  return PriorTransformer(
      embed_dim=embed_dim, text_width=text_width, width=m.width, depth=m.depth,
      num_heads=m.num_heads, context_length=context_length, mlp_ratio=m.mlp_ratio,
      dropout=m.dropout, dtype=DTYPES[config.dtype], remat_policy=m.remat_policy,
      scan_layers=m.scan_layers)


@flax.struct.dataclass
class EmbeddingScaler:
  """CLIP space <-> the prior's diffusion space: x = (z - mean) / std, per dimension.

  Diffusion assumes data of roughly unit variance per dimension; a unit-norm CLIP
  embedding has per-dimension values near 1/sqrt(embed_dim).
  """
  mean: jax.Array  # float32 [embed_dim]
  std: jax.Array  # float32 [embed_dim]

  def to_model(self, embedding: jax.Array) -> jax.Array:
    return (embedding - self.mean) / self.std

  def from_model(self, x: jax.Array) -> jax.Array:
    return x * self.std + self.mean


def make_scaler(embedding_scale: str, embed_dim: int,
                stats: tuple[np.ndarray, np.ndarray] | None = None) -> EmbeddingScaler:
  """`model.embedding_scale` -> a scaler. "standardize" needs `stats` (mean, std)."""
  zeros = np.zeros((embed_dim,), np.float32)
  if embedding_scale == "standardize":
    if stats is None:
      raise ValueError("embedding_scale='standardize' needs the training cache's "
                       "image embedding statistics")
    mean, std = (np.asarray(s, np.float32) for s in stats)
    # A dimension CLIP never varies would otherwise be divided by ~0.
    std = np.maximum(std, 1e-3 * float(np.mean(std)) + 1e-12)
    return EmbeddingScaler(jnp.asarray(mean), jnp.asarray(std))
  if embedding_scale == "sqrt_dim":
    scale = math.sqrt(embed_dim)
  else:
    try:
      scale = float(embedding_scale)
    except ValueError:
      raise ConfigError(f"model.embedding_scale={embedding_scale!r}: use "
                        "'standardize', 'sqrt_dim' or a number such as 17.2") from None
    if scale <= 0:
      raise ConfigError(f"model.embedding_scale={embedding_scale!r} must be > 0")
  return EmbeddingScaler(jnp.asarray(zeros), jnp.full((embed_dim,), 1.0 / scale))


def text_drop_mask(rng: jax.Array, batch_size: int, drop_prob: float) -> jax.Array:
  """bool [batch_size]: True where the caption is replaced by the learned null."""
  return jax.random.bernoulli(rng, drop_prob, (batch_size,))


def select_best_candidate(candidates: jax.Array, text_embedding: jax.Array) -> jax.Array:
  """[num_candidates, B, D] image embeddings -> [B, D]: per caption, the candidate
  whose direction has the highest dot product with z_t [B, D] (§2.1)."""
  scores = jnp.einsum("nbd,bd->nb", l2_normalize(candidates),
                      text_embedding.astype(jnp.float32))
  best = jnp.argmax(scores, axis=0)  # [B]
  return jnp.take_along_axis(candidates, best[None, :, None], axis=0)[0]


class DiffusionPrior:
  """The prior's model, noise schedule and embedding scaler: its training loss and
  its sampler, shared by the stage and the sampling pipeline."""

  def __init__(self, model: PriorTransformer, scaler: EmbeddingScaler, *,
               schedule: str = "cosine", num_timesteps: int = 1000,
               text_drop_prob: float = 0.1):
    self.model = model
    self.scaler = scaler
    self.schedule = diffusion.make_schedule(schedule, num_timesteps)
    self.text_drop_prob = text_drop_prob
    # One compiled function per (shapes, num_steps, guidance_scale, candidates, eta).
    self.sample = jax.jit(self._sample, static_argnames=(
        "num_steps", "guidance_scale", "num_candidates", "eta"))

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict, *, embed_dim: int,
                  text_width: int, context_length: int,
                  stats: tuple[np.ndarray, np.ndarray] | None = None
                  ) -> "DiffusionPrior":
    model = build_prior_model(config, embed_dim=embed_dim, text_width=text_width,
                              context_length=context_length)
    return cls(model, make_scaler(config.model.embedding_scale, embed_dim, stats),
               schedule=config.diffusion.schedule,
               num_timesteps=config.diffusion.num_timesteps,
               text_drop_prob=config.model.text_drop_prob)

  def init_params(self, rng: jax.Array) -> Any:
    """Params boxed with logical axis names."""
    m = self.model
    batch = 1
    return m.init(
        rng, jnp.zeros((batch, m.embed_dim)), jnp.zeros((batch,), jnp.int32),
        jnp.zeros((batch, m.embed_dim)),
        jnp.zeros((batch, m.context_length, m.text_width)),
        jnp.ones((batch, m.context_length), bool), jnp.zeros((batch,), bool))["params"]

  def _conditional_model(self, params, text_embedding, text_encodings, text_mask, *,
                         dropout_rng=None):
    """model_fn(x_t, t, drop_text) for the diffusion functions; the caption inputs
    are repeated to x_t's batch (guidance doubles it)."""
    # A model with a shorter text context than CLIP's reads the first tokens only.
    context = self.model.context_length
    text_encodings, text_mask = text_encodings[:, :context], text_mask[:, :context]

    def model_fn(x_t, t, drop_text):
      condition = diffusion.match_batch(
          (text_embedding, text_encodings, text_mask), x_t.shape[0])
      return self.model.apply(
          {"params": params}, x_t, t, *condition, drop_text,
          deterministic=dropout_rng is None,
          rngs=None if dropout_rng is None else {"dropout": dropout_rng})
    return model_fn

  def losses(self, params, batch, rng: jax.Array, *, train: bool = True
             ) -> tuple[jax.Array, jax.Array]:
    """Per-example MSE to the scaled z_i [B] and the text-drop mask [B].

    `train=False`: no caption dropped, no dropout (held-out loss).
    """
    drop_rng, diffusion_rng, dropout_rng = jax.random.split(rng, 3)
    batch_size = batch[IMAGE_EMBEDDING].shape[0]
    if train:
      drop = text_drop_mask(drop_rng, batch_size, self.text_drop_prob)
    else:
      drop = jnp.zeros((batch_size,), bool)
    use_dropout = train and self.model.dropout > 0
    conditional = self._conditional_model(
        params, batch[TEXT_EMBEDDING], batch[TEXT_ENCODINGS], batch[TEXT_MASK],
        dropout_rng=dropout_rng if use_dropout else None)
    x0 = self.scaler.to_model(batch[IMAGE_EMBEDDING].astype(jnp.float32))
    per_example, _ = diffusion.training_losses(
        self.schedule, lambda x_t, t: conditional(x_t, t, drop), x0, diffusion_rng,
        parameterization=PARAMETERIZATION)
    return per_example, drop

  def _sample(self, params, text_embedding, text_encodings, text_mask, rng, *,
              num_steps: int, guidance_scale: float = 1.0, num_candidates: int = 2,
              eta: float = 0.0, drop_text: jax.Array | None = None) -> jax.Array:
    """Image embeddings [B, D] in CLIP space (not renormalised) for captions given
    as z_t [B, D], token encodings [B, L, W] and their mask bool [B, L].
    `drop_text` bool [B]: rows sampled unconditionally (the learned null caption
    in place of theirs, e.g. for an empty prompt)."""
    batch_size = text_embedding.shape[0]
    # Candidates run as one batch: row c * B + b is candidate c of caption b.
    tiled = diffusion.match_batch((text_embedding, text_encodings, text_mask),
                                  num_candidates * batch_size)
    conditional = self._conditional_model(params, *tiled)
    if drop_text is not None:
      caption_model = conditional
      conditional = lambda x_t, t, drop: caption_model(
          x_t, t, drop | diffusion.match_batch(drop_text, x_t.shape[0]))
    model_fn = diffusion.guided(conditional, guidance_scale)
    x = diffusion.ddim_sample(
        model_fn, diffusion.respace(self.schedule, num_steps),
        shape=(num_candidates * batch_size, self.model.embed_dim), rng=rng,
        parameterization=PARAMETERIZATION, eta=eta)
    candidates = self.scaler.from_model(x).reshape(
        num_candidates, batch_size, self.model.embed_dim)
    return select_best_candidate(candidates, text_embedding)


def cosine_similarity(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  """Row-wise cosine of [N, D] x2 -> [N]."""
  a = a / np.linalg.norm(a, axis=-1, keepdims=True)
  b = b / np.linalg.norm(b, axis=-1, keepdims=True)
  return np.sum(a * b, axis=-1)


def sample_metrics(sampled: np.ndarray, true: np.ndarray) -> dict[str, float]:
  """How close sampled z_i [N, D] are to the true ones [N, D] of their captions.

  prior_cos: mean cosine to the caption's own image embedding; prior_cos_shuffled: to
  another caption's (a fixed derangement: the chance level); prior_top1: how often the
  sample's nearest image embedding among all N is its own.
  """
  assert sampled.shape == true.shape, (sampled.shape, true.shape)
  shuffled = np.roll(np.arange(len(true)), 1)
  unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)
  similarity = unit(sampled) @ unit(true).T
  return {
      "eval/prior_cos": float(np.mean(cosine_similarity(sampled, true))),
      "eval/prior_cos_shuffled": float(np.mean(cosine_similarity(sampled,
                                                                 true[shuffled]))),
      "eval/prior_top1": float(np.mean(similarity.argmax(axis=1)
                                       == np.arange(len(true)))),
  }


def _write_frozen_clip(path: str, clip: frozen.FrozenClip, stats) -> None:
  mean, std = stats
  info = {"fingerprint": clip.fingerprint, "workdir": clip.workdir, "step": clip.step,
          "embed_dim": clip.embed_dim, "text_width": clip.text_width,
          "context_length": clip.context_length,
          "image_embedding_mean": np.asarray(mean).tolist(),
          "image_embedding_std": np.asarray(std).tolist()}
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(info, f)
  os.replace(tmp, path)


class PriorStage(Stage):
  """Trains the diffusion prior on a frozen CLIP's cached outputs."""

  def validate(self):
    c = self.config
    if not c.get("clip_workdir"):
      raise ConfigError(f"clip_workdir is not set; pass --config.clip_workdir=DIR, "
                        f"{_CLIP_HELP}")
    if not os.path.isdir(c.clip_workdir):
      raise WorkdirError(f"clip_workdir={c.clip_workdir} does not exist; pass "
                         f"{_CLIP_HELP}")
    clip_config = frozen.read_config(c.clip_workdir, "clip")
    frozen.latest_step(c.clip_workdir, "clip", c.get("clip_step"))
    for field in ("name", "resolution", "num_emoji", "seed"):
      if c.data.get(field) != clip_config.data.get(field):
        raise ConfigError(
            f"data.{field}={c.data.get(field)!r} but the CLIP in {c.clip_workdir} was "
            f"trained with {clip_config.data.get(field)!r}; set "
            f"--config.data.{field}={clip_config.data.get(field)}")
    if c.model.width % c.model.num_heads:
      raise ConfigError(f"model.width={c.model.width} does not divide into "
                        f"model.num_heads={c.model.num_heads} heads")
    if not 0.0 <= c.model.text_drop_prob < 1.0:
      raise ConfigError(f"model.text_drop_prob={c.model.text_drop_prob}: must be "
                        "in [0, 1)")
    make_scaler(c.model.embedding_scale, 1, stats=(np.zeros(1), np.ones(1)))  # parses
    if c.sample.num_candidates < 1:
      raise ConfigError("sample.num_candidates must be >= 1")
    if not 1 <= c.sample.num_steps <= c.diffusion.num_timesteps:
      raise ConfigError(f"sample.num_steps={c.sample.num_steps}: must be in "
                        f"[1, diffusion.num_timesteps={c.diffusion.num_timesteps}]")
    if c.eval.num_examples < 2:
      raise ConfigError("eval.num_examples must be >= 2")

  def prepare(self):
    c = self.config
    self.clip = frozen.FrozenClip(c.clip_workdir, step=c.get("clip_step"))
    tokenizer_path = os.path.join(self.workdir, TOKENIZER_FILENAME)
    if jax.process_index() == 0 and not os.path.exists(tokenizer_path):
      # The prior reads captions through the CLIP's tokenizer: keep it with the run.
      shutil.copyfile(os.path.join(self.clip.workdir, TOKENIZER_FILENAME),
                      tokenizer_path)
    self.train_cache, self.eval_cache = (
        embedding_cache.build_or_load(
            self.workdir, split, pipeline.get_data_source(c.data, split), self.clip,
            batch_size=c.cache_batch_size)
        for split in (c.data.train_split, c.data.eval_split))
    stats = self.train_cache.image_embedding_stats
    if jax.process_index() == 0:
      _write_frozen_clip(os.path.join(self.workdir, FROZEN_CLIP_FILENAME), self.clip,
                         stats)
    self.prior = DiffusionPrior.from_config(
        c, embed_dim=self.clip.embed_dim, text_width=self.clip.text_width,
        context_length=self.clip.context_length, stats=stats)
    context = self.prior.model.context_length
    for cache in (self.train_cache, self.eval_cache):
      if cache.manifest["max_tokens"] > context:
        log.warning("%s captions have up to %d tokens; the prior reads the first %d "
                    "(model.text_context) and z_t", cache.name,
                    cache.manifest["max_tokens"], context)
    if len(self.eval_cache) < c.eval.num_examples:
      raise ConfigError(
          f"the {c.data.eval_split!r} split has {len(self.eval_cache)} examples, "
          f"fewer than eval.num_examples={c.eval.num_examples}; lower it")

  def init_params(self, rng):
    return self.prior.init_params(rng)

  def loss(self, params, batch, rng):
    per_example, dropped = self.prior.losses(params, batch, rng)
    return per_example.mean(), {"text_dropped": dropped.astype(jnp.float32).mean()}

  @staticmethod
  def _model_inputs(record):
    return {k: record[k] for k in MODEL_INPUTS}

  def train_iterator(self):
    return pipeline.make_train_iterator(
        self.train_cache, global_batch_size=self.config.batch_size,
        seed=self.config.seed, preprocess=self._model_inputs)

  @functools.cached_property
  def _eval_losses(self):
    return jax.jit(lambda params, batch, rng: self.prior.losses(
        params, batch, rng, train=False)[0])

  def eval_examples(self) -> list[int]:
    """A fixed random subset of the held-out cache: the sampled captions, and the
    retrieval gallery."""
    order = np.random.default_rng(0).permutation(len(self.eval_cache))
    return sorted(order[:self.config.eval.num_examples].tolist())

  @functools.cached_property
  def _held_out(self) -> tuple[dict, dict]:
    """(examples for eval/loss, examples sampled), read from the cache once."""
    count = min(self.config.eval.loss_examples, len(self.eval_cache))
    return (self.eval_cache.arrays(range(count), MODEL_INPUTS),
            self.eval_cache.arrays(self.eval_examples(), MODEL_INPUTS))

  def _in_batches(self, arrays: dict, fn) -> np.ndarray:
    """fn(batch, first_row) over `arrays` in eval.batch_size chunks, the last padded
    by repetition (one compiled shape); the outputs concatenated, padding removed."""
    size = self.config.eval.batch_size
    total = len(next(iter(arrays.values())))
    outputs = []
    for start in range(0, total, size):
      rows = np.minimum(np.arange(start, start + size), total - 1)
      out = jax.device_get(fn({k: v[rows] for k, v in arrays.items()}, start))
      outputs.append(np.asarray(out)[:total - start])
    return np.concatenate(outputs)

  def evaluate(self, params, step):
    c, s = self.config, self.config.sample
    loss_examples, examples = self._held_out
    # The same t, noise and x_T at every evaluation: curves are not sampling noise.
    loss_rng, sample_rng = jax.random.split(jax.random.key(c.seed + 1))
    losses = self._in_batches(loss_examples, lambda batch, start: self._eval_losses(
        params, batch, jax.random.fold_in(loss_rng, start)))
    sampled = self._in_batches(examples, lambda batch, start: self.prior.sample(
        params, batch[TEXT_EMBEDDING], batch[TEXT_ENCODINGS], batch[TEXT_MASK],
        jax.random.fold_in(sample_rng, start), num_steps=s.num_steps,
        guidance_scale=float(s.guidance_scale), num_candidates=s.num_candidates,
        eta=float(s.eta)))
    metrics = sample_metrics(sampled, examples[IMAGE_EMBEDDING])
    metrics["eval/loss"] = float(np.mean(losses))
    # What z_t itself scores in place of a sample: the prior should beat it.
    metrics["eval/text_embedding_cos"] = float(np.mean(cosine_similarity(
        examples[TEXT_EMBEDDING], examples[IMAGE_EMBEDDING])))
    return metrics


class TrainedPrior(NamedTuple):
  config: ml_collections.ConfigDict
  prior: DiffusionPrior
  params: Any  # EMA params
  step: int
  clip_fingerprint: str  # FrozenClip.fingerprint of the CLIP it was trained on


def load_prior(workdir: str, step: int | None = None,
               sharding: Any = None) -> TrainedPrior:
  """A trained prior from its workdir alone: (config, DiffusionPrior, EMA params,
  step, clip_fingerprint).

  Sample with `prior.sample(params, z_t, token_encodings, text_mask, rng,
  num_steps=config.sample.num_steps, guidance_scale=..., num_candidates=...)` on
  the outputs of the CLIP in `config.clip_workdir` (FrozenClip); compare its
  fingerprint with `clip_fingerprint` to catch a CLIP retrained since.
  """
  config, params, step = frozen.load_trained(workdir, "prior", step, sharding)
  path = os.path.join(workdir, FROZEN_CLIP_FILENAME)
  if not os.path.exists(path):
    raise WorkdirError(f"{workdir} has no {FROZEN_CLIP_FILENAME}; it was not "
                       "written by a prior run")
  with open(path) as f:
    clip = json.load(f)
  prior = DiffusionPrior.from_config(
      config, embed_dim=clip["embed_dim"], text_width=clip["text_width"],
      context_length=clip["context_length"],
      stats=(clip["image_embedding_mean"], clip["image_embedding_std"]))
  return TrainedPrior(config, prior, params, step, clip["fingerprint"])

