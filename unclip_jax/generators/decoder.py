"""The decoder: CLIP image embedding z_i (+ caption) -> base image (DALL-E 2 §2).

A GLIDE/ADM UNet (models/unet.py) sees z_i twice: projected and added to the
timestep embedding, and projected into `model.num_image_tokens` context tokens that
join the caption's token sequence (the UNet's own text transformer, GLIDE's
pathway) in every attention layer. For classifier-free guidance, z_i is replaced by
a learned null embedding and the caption by the empty caption, independently, at
the config's rates. The loss is the MSE to the noise, v or x0, plus improved DDPM's
VLB term when the variance is learned. Sampling is guided ddim, ddpm (small,
large or the learned variance) or analytic over a respaced schedule, one
compiled function; `invert` runs the DDIM eta=0 ODE the other way.
"""
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import ml_collections

from unclip_jax.errors import ConfigError
from unclip_jax.generators import common
from unclip_jax.generators.base import (IMAGE, IMAGE_EMBEDDING, TOKENS, ClipSizes,
                                        EpsMoments, Generator)
from unclip_jax.models.precision import DTYPES
from unclip_jax.models.unet import UNet


def validate_config(config: ml_collections.ConfigDict) -> None:
  """One-line ConfigError for a decoder config that cannot work (CLIP not read)."""
  m = config.model
  common.check_unet_config(config)
  if m.text_depth < 1:
    raise ConfigError(f"model.text_depth={m.text_depth}: the decoder reads the caption "
                      "through its own text transformer; use >= 1")
  if m.text_width % m.text_heads:
    raise ConfigError(f"model.text_width={m.text_width} does not divide into "
                      f"model.text_heads={m.text_heads} heads")
  if m.get("text_context") is not None and m.text_context < 1:
    raise ConfigError(f"model.text_context={m.text_context} must be >= 1 (or unset)")
  for name in ("image_embedding_drop_prob", "text_drop_prob"):
    if not 0.0 <= m[name] < 1.0:
      raise ConfigError(f"model.{name}={m[name]}: must be in [0, 1)")
  if m.vlb_weight < 0:
    raise ConfigError(f"model.vlb_weight={m.vlb_weight} must be >= 0")
  common.validate_diffusion_config(config)


def build_unet(config: ml_collections.ConfigDict, *, image_embedding_dim: int,
               vocab_size: int, context_length: int) -> UNet:
  """The UNet a decoder config describes, for a CLIP of these sizes (its embedding
  width, tokenizer vocabulary and context; `model.text_context` overrides the
  context)."""
  m = config.model
  return UNet(
      base_channels=m.base_channels, channel_mults=tuple(m.channel_mults),
      num_res_blocks=m.num_res_blocks,
      attention_resolutions=tuple(m.attention_resolutions),
      resolution=config.data.resolution, head_channels=m.head_channels,
      dropout=m.dropout, in_channels=3 + 2 * bool(m.get("coordinate_channels")),
      out_channels=6 if m.learned_variance else 3,
      norm_groups=m.norm_groups, image_embedding_dim=image_embedding_dim,
      num_image_tokens=m.num_image_tokens, vocab_size=vocab_size,
      context_length=m.get("text_context") or context_length,
      text_width=m.text_width, text_depth=m.text_depth, text_heads=m.text_heads,
      dtype=DTYPES[config.dtype], remat=m.remat)


def fit_context(tokens: jax.Array, length: int) -> jax.Array:
  """int [B, L] -> int32 [B, length]: the first `length` tokens, or right-padded
  with the pad id 0."""
  tokens = jnp.asarray(tokens, jnp.int32)
  if tokens.shape[1] >= length:
    return tokens[:, :length]
  return jnp.pad(tokens, ((0, 0), (0, length - tokens.shape[1])))


def with_coordinates(images: jax.Array) -> jax.Array:
  """[B, H, W, C] -> [B, H, W, C + 2]: row and column in [-1, 1] appended
  (CoordConv), so that the UNet knows where each pixel is."""
  batch, height, width, _ = images.shape
  rows, cols = jnp.meshgrid(jnp.linspace(-1.0, 1.0, height),
                            jnp.linspace(-1.0, 1.0, width), indexing="ij")
  coordinates = jnp.broadcast_to(jnp.stack([rows, cols], -1).astype(images.dtype),
                                 (batch, height, width, 2))
  return jnp.concatenate([images, coordinates], axis=-1)


def training_draws(rng: jax.Array, batch_size: int, image_shape: Sequence[int], *,
                   num_timesteps: int, image_embedding_drop_prob: float,
                   text_drop_prob: float) -> dict[str, jax.Array]:
  """Every random choice of a training loss but dropout, from two draws.

  Returns `drop_image_embedding`, `drop_text` (bool [B], independent Bernoullis: z_i
  replaced by the learned null, the caption by the empty one), `t` (int32 [B]
  step indices, uniform over the schedule) and `noise` ([B, *image_shape]). Two
  draws, not four: each is a threefry kernel, and they dominate this step's
  compile time on CPU.
  """
  uniform_rng, normal_rng = jax.random.split(rng)
  uniforms = jax.random.uniform(uniform_rng, (batch_size, 3))
  t = jnp.minimum((uniforms[:, 2] * num_timesteps).astype(jnp.int32),
                  num_timesteps - 1)
  return {"drop_image_embedding": uniforms[:, 0] < image_embedding_drop_prob,
          "drop_text": uniforms[:, 1] < text_drop_prob, "t": t,
          "noise": jax.random.normal(normal_rng, (batch_size, *image_shape))}


class Decoder(Generator):
  """The decoder's UNet and noise schedule: its training loss, its guided sampler
  and its DDIM inversion."""

  def __init__(self, config: ml_collections.ConfigDict, *, image_embedding_dim: int,
               vocab_size: int, context_length: int):
    self.config = config
    m = config.model
    self.model = build_unet(config, image_embedding_dim=image_embedding_dim,
                            vocab_size=vocab_size, context_length=context_length)
    self.image_embedding_dim = image_embedding_dim
    self.clip_context = context_length  # caption tokens the CLIP's tokenizer gives
    self.context_length = self.model.context_length  # caption tokens read
    self.resolution = config.data.resolution
    self.parameterization = config.diffusion.parameterization
    self.learned_variance = bool(m.learned_variance)
    self.coordinate_channels = bool(m.get("coordinate_channels"))
    self.schedule = common.schedule_from_config(config)
    kwargs = dict(parameterization=self.parameterization,
                  learned_variance=self.learned_variance)
    self._sampler = common.make_sampler(
        self._apply_encoded, self.schedule, encode_fn=self._encode, **kwargs)
    self._inverter = common.make_ddim_inverter(
        self._apply_encoded, self.schedule, encode_fn=self._encode, **kwargs)

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict,
                  clip_sizes: ClipSizes | None) -> "Decoder":
    validate_config(config)
    if clip_sizes is None:
      raise ConfigError("the decoder reads a CLIP: give its sizes (clip_sizes)")
    return cls(config, image_embedding_dim=clip_sizes.embed_dim,
               vocab_size=clip_sizes.vocab_size,
               context_length=clip_sizes.context_length)

  def abstract_batch(self, batch_size: int) -> dict[str, jax.ShapeDtypeStruct]:
    side = self.resolution
    return {IMAGE: jax.ShapeDtypeStruct((batch_size, side, side, 3), jnp.float32),
            IMAGE_EMBEDDING: jax.ShapeDtypeStruct(
                (batch_size, self.image_embedding_dim), jnp.float32),
            TOKENS: jax.ShapeDtypeStruct((batch_size, self.clip_context),
                                         jnp.int32)}

  def init_params(self, rng: jax.Array) -> Any:
    """Params boxed with logical axis names."""
    side = self.resolution
    return self.model.init(
        rng, jnp.zeros((1, side, side, self.model.in_channels)),
        jnp.zeros((1,), jnp.int32),
        image_embedding=jnp.zeros((1, self.image_embedding_dim)),
        tokens=jnp.zeros((1, self.context_length), jnp.int32))["params"]

  def apply(self, params, x_t, t, condition, drop_image_embedding, drop_text=None,
            dropout_rng=None):
    """UNet output for x_t [B, H, W, 3] at original timesteps t [B]; condition is
    (z_i [B, D], tokens [B, L]). One `drop` for both (guidance's unconditional
    half drops z_i and the caption together) unless drop_text is given."""
    image_embedding, tokens = condition
    if self.coordinate_channels:
      x_t = with_coordinates(x_t)
    return self.model.apply(
        {"params": params}, x_t, t,
        image_embedding=image_embedding.astype(jnp.float32),
        tokens=fit_context(tokens, self.context_length),
        drop_image_embedding=drop_image_embedding,
        drop_text=drop_image_embedding if drop_text is None else drop_text,
        deterministic=dropout_rng is None,
        rngs=None if dropout_rng is None else {"dropout": dropout_rng})

  def _encode(self, params, condition, drop):
    """The UNet's work on (z_i, tokens) alone, for rows dropped where `drop`
    (z_i and caption together): computed once per sampler call."""
    image_embedding, tokens = condition
    return self.model.apply(
        {"params": params}, None, None,
        image_embedding=image_embedding.astype(jnp.float32),
        tokens=fit_context(tokens, self.context_length),
        drop_image_embedding=drop, drop_text=drop, return_conditioning=True)

  def _apply_encoded(self, params, x_t, t, encoded, drop=None):
    del drop  # in `encoded` already
    if self.coordinate_channels:
      x_t = with_coordinates(x_t)
    return self.model.apply({"params": params}, x_t, t, conditioning=encoded)

  def losses(self, params, batch, rng: jax.Array, *, train: bool = True
             ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Per-example loss [B] on a batch of `image` [B, R, R, 3] in [-1, 1],
    `image_embedding` [B, D], `tokens` [B, L]; and aux [B] arrays: `mse`, `vlb`
    (learned variance), the drop masks.

    `train=False` (held-out loss): nothing dropped, no dropout.
    """
    m = self.config.model
    images = batch[IMAGE]
    draws_rng, dropout_rng = jax.random.split(rng)
    draws = training_draws(
        draws_rng, images.shape[0], images.shape[1:],
        num_timesteps=self.schedule.num_timesteps,
        image_embedding_drop_prob=m.image_embedding_drop_prob if train else 0.0,
        text_drop_prob=m.text_drop_prob if train else 0.0)
    use_dropout = train and self.model.dropout > 0
    condition = (batch[IMAGE_EMBEDDING], batch[TOKENS])
    model_fn = lambda x_t, t: self.apply(
        params, x_t, t, condition, draws["drop_image_embedding"], draws["drop_text"],
        dropout_rng=dropout_rng if use_dropout else None)
    per_example, aux = common.image_losses(
        self.schedule, model_fn, images, None, t=draws["t"], noise=draws["noise"],
        parameterization=self.parameterization,
        learned_variance=self.learned_variance, vlb_weight=m.vlb_weight)
    aux = {k: v for k, v in aux.items() if k != "t"}
    aux["image_embedding_dropped"] = draws["drop_image_embedding"]
    aux["text_dropped"] = draws["drop_text"]
    return per_example, aux

  def _condition(self, conditioning) -> tuple[jax.Array, jax.Array]:
    """(z_i float32 [B, D], tokens int32 [B, context]); no tokens: the empty
    caption."""
    image_embedding = jnp.asarray(conditioning[IMAGE_EMBEDDING], jnp.float32)
    tokens = conditioning.get(TOKENS)
    if tokens is None:
      tokens = jnp.zeros((image_embedding.shape[0], self.context_length), jnp.int32)
    return image_embedding, fit_context(tokens, self.context_length)

  def sample(self, params, conditioning, rng: jax.Array, *,
             num_steps: int | None = None, guidance_scale: float | None = None,
             x_T: jax.Array | None = None, step_noise: jax.Array | None = None,
             sampler: str | None = None,
             eta: float | None = None, variance: str | None = None,
             clip_denoised: bool | None = None,
             threshold_percentile: float | None = None,
             eps_moments: EpsMoments | None = None) -> jax.Array:
    """Images float32 [B, R, R, 3] (roughly in [-1, 1]) for `conditioning`: CLIP
    image embeddings z_i [B, D] (`image_embedding`) and caption tokens int [B, L]
    (`tokens`, CLIP's tokenizer; absent or None: the empty caption), in one
    compiled call.

    Options left None take `config.sample`: `sampler` 'ddim' (`eta`), 'ddpm'
    (`variance`: 'small', 'large' or 'learned'; None: what the model was
    trained for) or 'analytic' (`eps_moments`, default the workdir's);
    `threshold_percentile` (dynamic thresholding of the predicted x0, replacing
    `clip_denoised`). Guidance mixes the conditional output with the one where
    z_i and the caption are both dropped. `x_T` [B, R, R, 3]: the starting noise
    (else drawn from rng, the same whatever the condition).
    """
    s = self.config.sample
    condition = self._condition(conditioning)
    side = self.resolution
    moments, chosen = common.resolve_sampling(
        self, num_steps=num_steps, sampler=sampler, variance=variance, eta=eta,
        eps_moments=eps_moments, learned_variance=self.learned_variance)
    return self._sampler(
        params, condition, rng, moments,
        shape=(condition[0].shape[0], side, side, 3),
        guidance_scale=float(s.guidance_scale if guidance_scale is None
                             else guidance_scale),
        x_T=x_T, step_noise=step_noise, **chosen, **common.image_sampling(
            self.config, clip_denoised=clip_denoised,
            threshold_percentile=threshold_percentile))

  def estimate_eps_moments(self, params, batch, rng: jax.Array, *,
                           grid_size: int) -> jax.Array:
    """Gamma [grid_size] of the conditional decoder (z_i and caption kept) on
    `image` [B, R, R, 3] in [-1, 1], `image_embedding`, `tokens`."""
    condition = self._condition(batch)
    encoded = self._encode(params, condition,
                           jnp.zeros((condition[0].shape[0],), bool))
    return common.estimate_moments_on_grid(
        lambda x_t, t: self._apply_encoded(params, x_t, t, encoded),
        self.schedule, batch[IMAGE], rng, grid_size=grid_size,
        parameterization=self.parameterization,
        learned_variance=self.learned_variance)

  def invert(self, params, conditioning, images: jax.Array, *,
             num_steps: int | None = None, guidance_scale: float | None = None,
             fixed_point_iterations: int = 2) -> jax.Array:
    """x_T float32 [B, R, R, 3] of images [B, R, R, 3] in [-1, 1] under the eta=0
    sampler: `sample(..., x_T=x_T, eta=0, clip_denoised=False)` with the same
    conditioning, steps and guidance gives the images back (to the ODE's
    discretisation error). Inversion is DDIM whatever `sample.sampler` is."""
    return common.run_inverter(
        self, self._inverter, params, self._condition(conditioning), images,
        num_steps=num_steps, guidance_scale=guidance_scale,
        fixed_point_iterations=fixed_point_iterations)
