"""Kakao Brain's Karlo (unCLIP in diffusers' layout) as generators of our chain.

A converted Karlo checkpoint (`python -m unclip_jax.convert karlo`) is three
workdirs whose config says `model.arch = "karlo"`; `generators.load` builds
these classes for them, and `UnCLIPPipeline` samples them as Karlo does:
- the prior (models/karlo_prior.py) predicts the standardised image embedding
  x0 from the raw (not normalised) CLIP text embedding and token encodings,
  clipped to [-5, 5] at each step, then unstandardised with its own stored
  mean and std;
- the decoder (models/karlo_unet.py + karlo_text_proj.py) reads the raw image
  embedding, the caption's text embedding and encodings through the text
  projection, and predicts eps with a learned variance range;
- the super-resolution stage runs `super_res_first` at every step but the last
  (t = 0), `super_res_last` there, on the noise beside the bicubic-enlarged
  low-resolution image.
Guidance's unconditional rows read the CLIP outputs of the empty caption
(NULL_TEXT_*; the decoder also its learned null image embedding), not learned
null captions as ours do. Every stage samples with `ddpm` over Karlo's
respacing (the same kept timesteps as ours) by default; the other samplers
work too. These stages sample only: fine-tuning them is not supported.
"""

import jax
import jax.numpy as jnp
import ml_collections

from unclip_jax import diffusion
from unclip_jax.errors import UserError
from unclip_jax.generators import common
from unclip_jax.generators.base import (IMAGE_EMBEDDING, LOW_RES, NULL_TEXT_EMBEDDING,
                                        NULL_TEXT_ENCODINGS, NULL_TEXT_MASK,
                                        TEXT_EMBEDDING, TEXT_ENCODINGS, TEXT_MASK,
                                        ClipSizes, Generator)
from unclip_jax.generators.prior import select_best_candidate
from unclip_jax.models.karlo_prior import KarloPrior
from unclip_jax.models.karlo_text_proj import KarloTextProj
from unclip_jax.models.karlo_unet import KarloUNet

ARCH = "karlo"
CAPTION_FIELDS = (TEXT_EMBEDDING, TEXT_ENCODINGS, TEXT_MASK, NULL_TEXT_EMBEDDING,
                  NULL_TEXT_ENCODINGS, NULL_TEXT_MASK)


def kwargs(section: ml_collections.ConfigDict) -> dict:
  """Module keyword arguments from a config section (JSON lists -> tuples)."""
  return {k: tuple(v) if isinstance(v, list) else v
          for k, v in section.to_dict().items()}


def caption_or_null(drop: jax.Array, caption: tuple, null: tuple) -> tuple:
  """Per row, the caption's arrays or the empty caption's where `drop` [B]."""
  def pick(c, n):
    where = drop.reshape(drop.shape + (1,) * (c.ndim - 1))
    return jnp.where(where, n.astype(c.dtype), c)
  return tuple(pick(c, n) for c, n in zip(caption, null))


class _KarloStage(Generator):
  """What the three share: config, schedule, one compiled sampler, no training."""

  def __init__(self, config: ml_collections.ConfigDict, apply_fn, *,
               parameterization: str, learned_variance: bool = False,
               encode_fn=None):
    self.config = config
    self.schedule = common.schedule_from_config(config)
    self.parameterization = parameterization
    self.learned_variance = learned_variance
    self._sampler = common.make_sampler(
        apply_fn, self.schedule, parameterization=parameterization,
        learned_variance=learned_variance, encode_fn=encode_fn,
        respace=lambda schedule, num_steps: diffusion.unclip_scheduler_schedule(
            schedule.num_timesteps, num_steps))

  def _options(self, num_steps, sampler, variance, eta) -> dict:
    moments, chosen = common.resolve_sampling(
        self, num_steps=num_steps, sampler=sampler, variance=variance, eta=eta,
        eps_moments=None, learned_variance=self.learned_variance)
    del moments  # 'analytic' needs moments no converted checkpoint has
    return chosen

  def losses(self, params, batch, rng, *, train=True):
    raise UserError("converted Karlo stages sample only; fine-tuning them is not "
                    "supported (train our own prior/decoder on the converted CLIP)")

  def abstract_batch(self, batch_size: int):
    raise UserError("converted Karlo stages sample only; they have no training batch")


class KarloPriorGenerator(_KarloStage):
  """Karlo's prior: caption -> raw CLIP image embedding [B, D]."""
  unit_norm_text_embedding = False
  caption_fields = CAPTION_FIELDS

  def __init__(self, config: ml_collections.ConfigDict):
    self.model = KarloPrior(**kwargs(config.model.prior))
    super().__init__(config, self._apply_cached, parameterization="x0",
                     encode_fn=self._encode_caption)

  @classmethod
  def from_config(cls, config, clip_sizes: ClipSizes | None):
    return cls(config)

  def init_params(self, rng):
    m, batch = self.model, 1
    dim, context = m.embedding_dim, m.context_length
    return m.init(rng, jnp.zeros((batch, dim)), jnp.zeros((batch,), jnp.int32),
                  jnp.zeros((batch, m.text_embedding_dim or dim)),
                  jnp.zeros((batch, context, dim)),
                  jnp.ones((batch, context), bool))["params"]

  def _encode_caption(self, params, condition, drop):
    """Every layer's keys and values of each row's caption (the empty one's where
    `drop`), once per sampler call: under causal attention the caption never
    sees the step's tokens (models/karlo_prior.py)."""
    caption = caption_or_null(drop, condition[:3], condition[3:])
    return self.model.apply({"params": params}, *caption,
                            method=KarloPrior.encode_prefix)

  def _apply_cached(self, params, x_t, t, prefix, drop):
    del drop  # in `prefix`
    return self.model.apply({"params": params}, x_t, t, prefix,
                            method=KarloPrior.predict_from_prefix)

  def sample(self, params, conditioning, rng, *, num_steps=None, guidance_scale=None,
             x_T=None, step_noise=None, num_candidates=None, sampler=None, eta=None,
             variance=None, eps_moments=None):
    """Raw image embeddings float32 [B, D] for `conditioning`'s caption fields
    (CAPTION_FIELDS; text embedding raw). `x_T`, `step_noise` [K, n*B, D]: the
    starting and per-step noise instead of draws (candidate c of caption b in
    row c * B + b)."""
    s = self.config.sample
    candidates = int(num_candidates or s.num_candidates)
    caption = tuple(jnp.asarray(conditioning[k]) for k in CAPTION_FIELDS)
    batch, dim = caption[0].shape
    condition = diffusion.match_batch(caption, candidates * batch)
    x = self._sampler(
        params, condition, rng, x_T=x_T, step_noise=step_noise,
        shape=(candidates * batch, dim),
        guidance_scale=float(s.guidance_scale if guidance_scale is None
                             else guidance_scale),
        clip_denoised=float(s.clip_range), threshold_percentile=None,
        **self._options(num_steps, sampler, variance, eta))
    embeddings = self.model.apply({"params": params}, x,
                                  method=KarloPrior.unnormalize)
    return select_best_candidate(embeddings.reshape(candidates, batch, dim),
                                 caption[0])


class KarloDecoderGenerator(_KarloStage):
  """Karlo's decoder: raw image embedding + caption -> 64 px images."""
  unit_norm_text_embedding = False
  unit_norm_image_embedding = False
  caption_fields = CAPTION_FIELDS

  def __init__(self, config: ml_collections.ConfigDict):
    self.unet = KarloUNet(**kwargs(config.model.unet))
    self.text_proj = KarloTextProj(**kwargs(config.model.text_proj))
    self.resolution = config.data.resolution
    self.context_length = config.model.context_length
    super().__init__(config, self._apply_unet, parameterization="eps",
                     learned_variance=True, encode_fn=self._encode_caption)
    self._inverter = common.make_ddim_inverter(
        self._apply_unet, self.schedule, parameterization="eps",
        learned_variance=True, encode_fn=self._encode_caption)

  @classmethod
  def from_config(cls, config, clip_sizes: ClipSizes | None):
    return cls(config)

  def init_params(self, rng):
    batch, side, context = 1, self.resolution, self.context_length
    unet_rng, proj_rng = jax.random.split(rng)
    embedding = jnp.zeros((batch, self.text_proj.clip_embedding_dim))
    inputs = (embedding, embedding,
              jnp.zeros((batch, context, self.text_proj.clip_embedding_dim)),
              jnp.zeros((batch,), bool))
    proj = self.text_proj.init(proj_rng, *inputs)
    hidden, time = jax.eval_shape(self.text_proj.apply, proj, *inputs)
    unet = self.unet.init(unet_rng, jnp.zeros((batch, side, side, self.unet.in_channels)),
                          jnp.zeros((batch,), jnp.int32), jnp.zeros(hidden.shape),
                          jnp.zeros(time.shape), jnp.ones(hidden.shape[:2], bool))
    return {"unet": unet["params"], "text_proj": proj["params"]}

  def _encode_caption(self, params, condition, drop):
    """(encoder states [B, S, C], additive time embedding [B, E], mask [B, S]):
    the text projection of each row, with the empty caption and the learned null
    image embedding where `drop`."""
    image_embedding, caption, null = condition[0], condition[1:4], condition[4:]
    text_embedding, encodings, mask = caption_or_null(drop, caption, null)
    states, time = self.text_proj.apply({"params": params["text_proj"]},
                                        image_embedding, text_embedding, encodings,
                                        drop)
    extra = states.shape[1] - mask.shape[1]
    mask = jnp.concatenate([jnp.ones((mask.shape[0], extra), bool), mask], axis=1)
    return states, time, mask

  def _apply_unet(self, params, x_t, t, encoded, drop):
    del drop  # in `encoded`
    states, time, mask = encoded
    return self.unet.apply({"params": params["unet"]}, x_t, t, states, time, mask)

  @staticmethod
  def _condition(conditioning) -> tuple:
    return (jnp.asarray(conditioning[IMAGE_EMBEDDING]),) + tuple(
        jnp.asarray(conditioning[k]) for k in CAPTION_FIELDS)

  def invert(self, params, conditioning, images, *, num_steps=None,
             guidance_scale=None, fixed_point_iterations=2):
    """x_T [B, r, r, 3] of images under the DDIM eta=0 sampler, as
    `Decoder.invert`."""
    return common.run_inverter(
        self, self._inverter, params, self._condition(conditioning), images,
        num_steps=num_steps, guidance_scale=guidance_scale,
        fixed_point_iterations=fixed_point_iterations)

  def sample(self, params, conditioning, rng, *, num_steps=None, guidance_scale=None,
             x_T=None, step_noise=None, sampler=None, eta=None, variance=None,
             clip_denoised=None, threshold_percentile=None, eps_moments=None):
    """Images float32 [B, r, r, 3] for raw `image_embedding` [B, D] and the
    caption fields (CAPTION_FIELDS)."""
    s = self.config.sample
    condition = self._condition(conditioning)
    batch = condition[0].shape[0]
    return self._sampler(
        params, condition, rng, x_T=x_T, step_noise=step_noise,
        shape=(batch, self.resolution, self.resolution, 3),
        guidance_scale=float(s.guidance_scale if guidance_scale is None
                             else guidance_scale),
        **common.image_sampling(self.config, clip_denoised=clip_denoised,
                                threshold_percentile=threshold_percentile),
        **self._options(num_steps, sampler, variance, eta))


class KarloSuperResGenerator(_KarloStage):
  """Karlo's super-resolution pair: low-res images -> `data.resolution` px."""

  def __init__(self, config: ml_collections.ConfigDict):
    self.unet = KarloUNet(**kwargs(config.model.unet))
    self.resolution = config.data.resolution
    super().__init__(config, self._apply_pair, parameterization="eps")

  @classmethod
  def from_config(cls, config, clip_sizes: ClipSizes | None):
    return cls(config)

  def init_params(self, rng):
    side = self.resolution
    x = jnp.zeros((1, side, side, self.unet.in_channels))
    t = jnp.zeros((1,), jnp.int32)
    first, last = jax.random.split(rng)
    return {"first": self.unet.init(first, x, t)["params"],
            "last": self.unet.init(last, x, t)["params"]}

  def _apply_pair(self, params, x_t, t, enlarged, drop):
    del drop  # unconditional
    inputs = jnp.concatenate([x_t, enlarged.astype(x_t.dtype)], axis=-1)
    # Every row of a step shares its timestep; the last step is t = 0.
    return jax.lax.cond(
        t[0] == 0,
        lambda: self.unet.apply({"params": params["last"]}, inputs, t),
        lambda: self.unet.apply({"params": params["first"]}, inputs, t))

  def sample(self, params, conditioning, rng, *, num_steps=None, guidance_scale=None,
             x_T=None, step_noise=None, sampler=None, eta=None, variance=None,
             clip_denoised=None, threshold_percentile=None, eps_moments=None):
    """Low-res images `low_res` [B, h, w, 3] in [-1, 1] -> float32 [B, R, R, 3]."""
    if guidance_scale not in (None, 1, 1.0):
      raise UserError("Karlo's super-resolution is unconditional: it takes no "
                      "guidance_scale")
    low_res = jnp.asarray(conditioning[LOW_RES], jnp.float32)
    shape = (low_res.shape[0], self.resolution, self.resolution, 3)
    # Bicubic (Keys, a = -0.5), as torch's antialiased bicubic that Karlo uses.
    enlarged = jax.image.resize(low_res, shape, "bicubic")
    return self._sampler(
        params, enlarged, rng, x_T=x_T, step_noise=step_noise, shape=shape,
        guidance_scale=1.0,
        **common.image_sampling(self.config, clip_denoised=clip_denoised,
                                threshold_percentile=threshold_percentile),
        **self._options(num_steps, sampler, variance, eta))


GENERATORS = {"prior": KarloPriorGenerator, "decoder": KarloDecoderGenerator,
              "upsampler": KarloSuperResGenerator}


def is_karlo(config: ml_collections.ConfigDict) -> bool:
  return config.get("model", {}).get("arch") == ARCH


__all__ = ["ARCH", "CAPTION_FIELDS", "GENERATORS", "KarloDecoderGenerator",
           "KarloPriorGenerator", "KarloSuperResGenerator", "is_karlo"]
