"""The diffusion prior: caption -> CLIP image embedding z_i (DALL-E 2 §2.1).

A causal transformer (models/prior.py) over [caption token encodings, z_t, timestep,
noised z_i, query] predicts the clean z_i (`diffusion.parameterization` "x0", the
paper's) with an MSE loss, on z_i standardised per dimension (or scaled by a
constant). The caption is replaced by learned null embeddings at
`model.text_drop_prob`, for classifier-free guidance. Sampling is ddim, ddpm or
analytic (Analytic-DPM: the paper's) over a respaced schedule with N candidates
per caption in one batch, keeping the one whose direction best matches z_t; one
compiled function. The caption never sees the step's tokens (causal attention):
the sampler encodes it once per call, every layer's keys and values
(`PriorTransformer.encode_prefix`), and each step runs only the 3 tokens after
it. No clipping or thresholding: z_i in the prior's space has no fixed range to
clip to (thresholding assumes data in [-1, 1]).
"""
import math
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from unclip_jax import diffusion, xla_options
from unclip_jax.errors import ConfigError
from unclip_jax.generators import common
from unclip_jax.generators.base import (IMAGE_EMBEDDING, TEXT_EMBEDDING,
                                        TEXT_ENCODINGS, TEXT_MASK, ClipSizes,
                                        EpsMoments, Generator)
from unclip_jax.models.clip import l2_normalize
from unclip_jax.models.precision import DTYPES
from unclip_jax.models.prior import PrefixCache, PriorTransformer

DROP_TEXT = "drop_text"  # optional conditioning: bool [B], sample without the caption


def validate_config(config: ml_collections.ConfigDict) -> None:
  """One-line ConfigError for a prior config that cannot work."""
  m = config.model
  if m.width % m.num_heads:
    raise ConfigError(f"model.width={m.width} does not divide into "
                      f"model.num_heads={m.num_heads} heads")
  if not 0.0 <= m.text_drop_prob < 1.0:
    raise ConfigError(f"model.text_drop_prob={m.text_drop_prob}: must be in [0, 1)")
  make_scaler(m.embedding_scale, 1, stats=(np.zeros(1), np.ones(1)))  # parses
  common.validate_diffusion_config(config)
  if config.sample.num_candidates < 1:
    raise ConfigError("sample.num_candidates must be >= 1")


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


class Prior(Generator):
  """The prior's model, noise schedule and embedding scaler: its training loss and
  its sampler."""

  def __init__(self, config: ml_collections.ConfigDict, model: PriorTransformer,
               scaler: EmbeddingScaler, clip_context: int):
    self.config = config
    self.clip_context = clip_context  # tokens per caption in the CLIP's outputs
    self.model = model
    self.scaler = scaler
    self.schedule = common.schedule_from_config(config)
    self.parameterization = config.diffusion.parameterization
    self.text_drop_prob = config.model.text_drop_prob
    # Analytic-DPM bounds E Var(x0 | x_t) per dimension by the data's mean
    # second moment: 1 once standardised; scale^2 / D for a unit-norm z_i
    # multiplied by a constant (1 for sqrt_dim).
    if config.model.embedding_scale == "standardize":
      self.x0_variance_bound = 1.0
    else:
      self.x0_variance_bound = float(np.mean(1.0 / np.square(
          np.asarray(scaler.std)))) / scaler.std.shape[0]
    # The steps run the prior on the caption's cached prefix (encoded once per
    # call); nested in `_sampler`, one compiled function per (shapes,
    # num_steps, guidance_scale, candidates, sampler, eta, variance).
    self._guided_sampler = common.make_sampler(
        self._apply_cached, self.schedule,
        parameterization=self.parameterization,
        encode_fn=self._encode_caption,
        x0_variance_bound=self.x0_variance_bound)
    self._sampler = xla_options.jit(self._sample, static_argnames=(
        "num_steps", "guidance_scale", "num_candidates", "sampler", "eta",
        "variance"))

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict,
                  clip_sizes: ClipSizes | None) -> "Prior":
    validate_config(config)
    if clip_sizes is None:
      raise ConfigError("the prior reads a CLIP: give its sizes (clip_sizes)")
    model = build_prior_model(config, embed_dim=clip_sizes.embed_dim,
                              text_width=clip_sizes.text_width,
                              context_length=clip_sizes.context_length)
    scaler = make_scaler(config.model.embedding_scale, clip_sizes.embed_dim,
                         clip_sizes.image_embedding_stats())
    return cls(config, model, scaler, clip_sizes.context_length)

  def abstract_batch(self, batch_size: int) -> dict[str, jax.ShapeDtypeStruct]:
    """What the embedding cache delivers (at the CLIP's full context)."""
    dim, context, width = (self.model.embed_dim, self.clip_context,
                           self.model.text_width)
    return {IMAGE_EMBEDDING: jax.ShapeDtypeStruct((batch_size, dim), jnp.float32),
            TEXT_EMBEDDING: jax.ShapeDtypeStruct((batch_size, dim), jnp.float32),
            TEXT_ENCODINGS: jax.ShapeDtypeStruct((batch_size, context, width),
                                                 jnp.float16),
            TEXT_MASK: jax.ShapeDtypeStruct((batch_size, context), jnp.bool_)}

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

  def _encode_caption(self, params, condition, drop) -> PrefixCache:
    """The prior's work on the caption alone, once per sampler call: the cached
    prefix of condition (z_t [B, D], encodings [B, L, W], mask [B, L], drop_text
    [B]) for rows whose caption is the learned null where `drop` [B] or
    drop_text."""
    text_embedding, text_encodings, text_mask, drop_text = condition
    return self.model.apply({"params": params}, text_embedding, text_encodings,
                            text_mask, drop | drop_text,
                            method=PriorTransformer.encode_prefix)

  def _apply_cached(self, params, x_t, t, prefix: PrefixCache, drop=None):
    """The predicted x0 [B, D] for x_t [B, D] at timesteps t [B], from the rows'
    `_encode_caption` prefix."""
    del drop  # in `prefix` already
    return self.model.apply({"params": params}, x_t, t, prefix,
                            method=PriorTransformer.predict_from_prefix)

  def losses(self, params, batch, rng: jax.Array, *, train: bool = True
             ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Per-example MSE to the scaled z_i [B], and `text_dropped` [B].

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
        parameterization=self.parameterization)
    return per_example, {"text_dropped": drop}

  def sample(self, params, conditioning, rng: jax.Array, *,
             num_steps: int | None = None, guidance_scale: float | None = None,
             x_T: jax.Array | None = None, step_noise: jax.Array | None = None,
             num_candidates: int | None = None,
             sampler: str | None = None, eta: float | None = None,
             variance: str | None = None,
             eps_moments: EpsMoments | None = None) -> jax.Array:
    """Image embeddings float32 [B, D] in CLIP space (not renormalised) for
    captions given as `conditioning`: z_t [B, D] (`text_embedding`), token
    encodings [B, L, W] (`text_encodings`), their mask bool [B, L] (`text_mask`)
    and optionally `drop_text` bool [B] (rows sampled without their caption, e.g.
    an empty prompt). `x_T` [num_candidates * B, D]: the starting noise, candidate
    c of caption b in row c * B + b; `step_noise` [num_steps, num_candidates * B,
    D]: each step's noise instead of draws. `sampler` 'ddim' (`eta`), 'ddpm'
    (`variance` 'small' or 'large') or 'analytic' (`eps_moments`, default the
    workdir's). Options left None take `config.sample`."""
    s = self.config.sample
    moments, chosen = common.resolve_sampling(
        self, num_steps=num_steps, sampler=sampler, variance=variance, eta=eta,
        eps_moments=eps_moments)
    return self._sampler(
        params, conditioning[TEXT_EMBEDDING], conditioning[TEXT_ENCODINGS],
        conditioning[TEXT_MASK], rng, drop_text=conditioning.get(DROP_TEXT),
        x_T=x_T, step_noise=step_noise, eps_moments=moments,
        guidance_scale=float(s.guidance_scale if guidance_scale is None
                             else guidance_scale),
        num_candidates=int(num_candidates or s.num_candidates), **chosen)

  def _sample(self, params, text_embedding, text_encodings, text_mask, rng, *,
              drop_text, x_T, num_steps: int, guidance_scale: float,
              num_candidates: int, eta: float, sampler: str = "ddim",
              variance: str | None = None, eps_moments=None,
              step_noise=None) -> jax.Array:
    batch_size = text_embedding.shape[0]
    context = self.model.context_length  # a shorter text context reads the first tokens
    if drop_text is None:
      drop_text = jnp.zeros((batch_size,), bool)
    # Candidates run as one batch: row c * B + b is candidate c of caption b.
    condition = diffusion.match_batch(
        (text_embedding, text_encodings[:, :context], text_mask[:, :context],
         drop_text.astype(bool)), num_candidates * batch_size)
    x = self._guided_sampler(
        params, condition, rng, eps_moments,
        shape=(num_candidates * batch_size, self.model.embed_dim),
        num_steps=num_steps, sampler=sampler, eta=eta, variance=variance,
        guidance_scale=guidance_scale, clip_denoised=False,
        threshold_percentile=None, x_T=x_T, step_noise=step_noise)
    candidates = self.scaler.from_model(x).reshape(
        num_candidates, batch_size, self.model.embed_dim)
    return select_best_candidate(candidates, text_embedding)

  def estimate_eps_moments(self, params, batch, rng: jax.Array, *,
                           grid_size: int) -> jax.Array:
    """Gamma [grid_size] of the captioned prior (no guidance) on held-out
    `image_embedding` (scaled as in training) and its caption's z_t, token
    encodings and mask."""
    conditional = self._conditional_model(
        params, batch[TEXT_EMBEDDING], batch[TEXT_ENCODINGS], batch[TEXT_MASK])
    x0 = self.scaler.to_model(batch[IMAGE_EMBEDDING].astype(jnp.float32))
    keep = jnp.zeros((x0.shape[0],), bool)
    return common.estimate_moments_on_grid(
        lambda x_t, t: conditional(x_t, t, keep), self.schedule, x0, rng,
        grid_size=grid_size, parameterization=self.parameterization)
