"""`UnCLIPPipeline`: prompts -> CLIP text embedding -> prior -> decoder ->
upsamplers, from trained workdirs (DALL-E 2 §2).

Each stage's sampler is its generator's one compiled function, run over fixed-size
chunks of rows split across the local devices (`parallel.local.map_batches`), so
it compiles once per chunk shape and sampling options. Randomness comes from `seed` only: the same seed, requests
and devices give the same images.
"""
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from unclip_jax.data import images as images_lib
from unclip_jax.errors import UserError
from unclip_jax.generators.base import (IMAGE_EMBEDDING, LOW_RES,
                                        NULL_TEXT_EMBEDDING, NULL_TEXT_ENCODINGS,
                                        NULL_TEXT_MASK, TEXT_EMBEDDING,
                                        TEXT_ENCODINGS, TEXT_MASK, TOKENS)
from unclip_jax.generators.prior import DROP_TEXT
from unclip_jax.models.clip import l2_normalize_host
from unclip_jax.parallel.local import chunk_size, map_batches
from unclip_jax.pipeline import loading, options
from unclip_jax.pipeline.manipulations import Manipulations
from unclip_jax.pipeline.prompts import check_prompts, encode_prompts
from unclip_jax.pipeline.results import Samples


_NOISE_BLOCK = 64  # rows of x_T drawn per compiled call, whatever is asked for


@jax.jit
def _noise_block(key: jax.Array, first_row: jax.Array, sample: jax.Array
                 ) -> jax.Array:
  # Row i's x_T depends on (seed, i) only, not on how many rows are asked for.
  rows = first_row + jnp.arange(_NOISE_BLOCK)
  return jax.vmap(lambda i: jax.random.normal(jax.random.fold_in(key, i),
                                              sample.shape))(rows)


class UnCLIPPipeline(Manipulations):
  """Text-to-image sampling and image manipulations with trained stages.

  pipe = UnCLIPPipeline.from_workdirs(clip=..., prior=..., decoder=...,
                                      upsamplers=[...])
  images = pipe(["red apple on a blue background"], num_images=4, seed=0)
  """

  def __init__(self, stages: loading.LoadedStages, *, max_batch: int = 64):
    self.stages = stages
    self.clip = stages.clip
    self.max_batch = options.count("max_batch", max_batch)

  @classmethod
  def from_workdirs(cls, clip: str, prior: str | None = None,
                    decoder: str | None = None, upsamplers: Sequence[str] = (),
                    step: loading.Steps = None, *, max_batch: int = 64
                    ) -> "UnCLIPPipeline":
    """Loads each stage's config and EMA params from its workdir (the latest
    checkpoint, or `step`: one for all, or {"clip": 100, "upsampler2": 50, ...})
    after checking that the stages fit together. The prior is needed only to
    sample from text; `max_batch` caps the rows of one compiled call."""
    if decoder is None:
      raise UserError("no decoder workdir given; pass decoder=DIR")
    return cls(loading.load_stages(clip, decoder, prior, upsamplers, step),
               max_batch=max_batch)

  @property
  def base_resolution(self) -> int:
    return self.stages.decoder.generator.resolution

  @property
  def resolution(self) -> int:
    """Side of the final images."""
    if not self.stages.upsamplers:
      return self.base_resolution
    return self.stages.upsamplers[-1].config.data.resolution

  def __call__(self, prompts: str | Sequence[str], num_images: int = 4,
               seed: int = 0, **kwargs) -> np.ndarray:
    """uint8 [len(prompts) * num_images, H, W, 3], prompt-major; keyword
    arguments as `generate`."""
    return self.generate(prompts, num_images, seed, **kwargs).images

  def generate(self, prompts: str | Sequence[str], num_images: int = 4,
               seed: int = 0, *, noises: Mapping[str, Any] | None = None,
               **sampling) -> Samples:
    """Images for prompts with every intermediate (z_t, z_i, x_T, each stage's
    images).

    `sampling`: per-stage options (docs/sampling.md), each left None taking
    the stage config's `sample.*` value: `prior_sampler`, `prior_steps`,
    `prior_guidance`, `prior_candidates`, `prior_eta`, `prior_variance`;
    `decoder_sampler`, `decoder_steps`, `decoder_guidance`, `decoder_eta`,
    `decoder_variance`, `decoder_threshold`; `upsampler_sampler`,
    `upsampler_steps`, `upsampler_eta`, `upsampler_variance`,
    `upsampler_threshold` (one for all upsamplers or a list of one each).
    A sampler is 'ddim', 'ddpm' or 'analytic'.

    `noises`: random draws to use instead of the seed's, to reproduce another
    implementation's run exactly or to study a sampler: {"prior": {"x_T": [N, D],
    "steps": [K, N, D]}, "decoder": {...}, "upsamplers": [{...}, ...]}, N the
    rows (prompts x num_images), K the stage's steps (the last step's noise is
    never used); any part may be left out.
    """
    options.check_names("generate", sampling,
                        options.PRIOR + options.DECODER + options.UPSAMPLER)
    if self.stages.prior is None:
      raise UserError("this pipeline has no prior, so it cannot sample from text; "
                      "load one with from_workdirs(prior=DIR)")
    prompts = check_prompts(prompts)
    num_images = options.count("num_images", num_images)
    prior = self.stages.prior
    prior_kwargs = options.prior_options(
        prior.config, moments=prior.eps_moments is not None,
        **options.of_stage("prior", sampling))
    decoder_kwargs = self._decoder_options(sampling)
    upsampler_kwargs = self._upsampler_options(sampling)
    keys = _Keys(seed)

    encoded = self._encode_prompts(prompts)
    raw = not prior.generator.unit_norm_text_embedding
    text_embeddings, text_encodings = self._clip_text(encoded.tokens, raw=raw)
    repeat = lambda x: np.repeat(x, num_images, axis=0)
    tokens, unconditional = repeat(encoded.tokens), repeat(encoded.unconditional)
    text_embeddings, text_encodings = repeat(text_embeddings), repeat(text_encodings)
    caption = {TEXT_EMBEDDING: text_embeddings, TEXT_ENCODINGS: text_encodings,
               TEXT_MASK: self.clip.text_mask(tokens)}
    if NULL_TEXT_EMBEDDING in prior.generator.caption_fields + (
        self.stages.decoder.generator.caption_fields):
      caption.update(self._null_caption(len(tokens)))

    noises = dict(noises or {})
    prior_noise = _stage_noise(noises.pop("prior", None), "prior", len(tokens))
    if prior_noise and prior_kwargs["num_candidates"] != 1:
      raise UserError("noises['prior'] needs prior_candidates=1")

    def sample_prior(chunk, start):
      return prior.generator.sample(
          prior.params, chunk, jax.random.fold_in(keys.prior, start),
          **_pop_noise(chunk), **prior_kwargs)
    image_embeddings = self._map_rows(sample_prior, {
        **caption, DROP_TEXT: unconditional, **prior_noise})
    if self.stages.decoder.generator.unit_norm_image_embedding:
      # The decoder only ever saw unit-norm CLIP embeddings; the prior's are close.
      image_embeddings = l2_normalize_host(image_embeddings)
    # An empty prompt's caption is the all-pad one the decoder learned to drop to.
    caption[TOKENS] = np.where(unconditional[:, None], 0, tokens)
    decoder_noise = _stage_noise(noises.pop("decoder", None), "decoder", len(tokens))
    upsampler_noise = [_stage_noise(n, f"upsamplers[{i}]", len(tokens))
                       for i, n in enumerate(noises.pop("upsamplers", ()))]
    if noises:
      raise UserError(f"noises has no stage {sorted(noises)}; use prior, decoder, "
                      "upsamplers")
    x_T = decoder_noise.pop("x_T", None)
    return self._decode(
        image_embeddings, caption,
        self.noise(seed, len(tokens)) if x_T is None else x_T, keys,
        decoder_kwargs, upsampler_kwargs, decoder_noise=decoder_noise,
        upsampler_noise=upsampler_noise,
        prompts=tuple(p for p in prompts for _ in range(num_images)), tokens=tokens,
        text_embeddings=text_embeddings)

  def decode(self, image_embeddings: np.ndarray, *,
             captions: str | Sequence[str] | None = None,
             noise: np.ndarray | None = None, seed: int = 0,
             clip_denoised: bool | None = None, **sampling) -> Samples:
    """Images for CLIP image embeddings z_i [N, D] (or [D]) through the decoder
    and upsamplers.

    `captions`: one for all rows or one per row (None: no caption). `noise`: the
    decoder's x_T ([N, r, r, 3] or one [r, r, 3] for all; None: drawn from
    seed). With a given x_T, clip_denoised defaults to False, so that
    decoding `invert`'s x_T with DDIM at eta=0 reconstructs the image.
    `sampling`: the decoder_* and upsampler_* options of `generate`.
    """
    options.check_names("decode", sampling, options.DECODER + options.UPSAMPLER)
    image_embeddings = np.atleast_2d(np.asarray(image_embeddings, np.float32))
    rows, width = image_embeddings.shape[0], self.clip.embed_dim
    if image_embeddings.ndim != 2 or not rows or image_embeddings.shape[1] != width:
      raise UserError(f"image_embeddings must be [N >= 1, {width}] (the CLIP's "
                      f"width); got {list(image_embeddings.shape)}")
    if not np.isfinite(image_embeddings).all():
      raise UserError("image_embeddings hold NaN or inf; pass CLIP embeddings, "
                      "e.g. from pipe.encode_images(...)")
    if noise is not None:
      noise = np.broadcast_to(np.asarray(noise, np.float32), (rows,) + (
          self.base_resolution, self.base_resolution, 3))
      clip_denoised = False if clip_denoised is None else clip_denoised
    return self._decode(
        image_embeddings, self._caption_fields(captions, rows),
        self.noise(seed, rows) if noise is None else noise, _Keys(seed),
        self._decoder_options(sampling, clip_denoised),
        self._upsampler_options(sampling))

  def encode_text(self, prompts: str | Sequence[str]) -> np.ndarray:
    """CLIP text embeddings z_t, float32 [N, D] unit-norm."""
    return self._clip_text(self._encode_prompts(check_prompts(prompts)).tokens)[0]

  def encode_images(self, images: Any) -> np.ndarray:
    """CLIP image embeddings z_i, float32 [N, D] unit-norm, of one image or a
    list (paths, PIL images or uint8 arrays; made square, resized to CLIP's
    side)."""
    squares = [images_lib.square_image(i) for i in images_lib.as_image_list(images)]
    pixels = images_lib.at_resolution(squares, self.clip.resolution)
    return map_batches(
        lambda chunk, start: self.clip.encode_image(chunk["pixels"]),
        {"pixels": pixels}, chunk_size(len(pixels), self.max_batch))

  def noise(self, seed: int, rows: int) -> np.ndarray:
    """The decoder's x_T for `rows` rows of `seed`: float32 [rows, r, r, 3]."""
    side, key = self.base_resolution, _Keys(seed).noise
    blocks = [np.asarray(_noise_block(key, first, jnp.zeros((side, side, 3))))
              for first in range(0, rows, _NOISE_BLOCK)]
    return np.concatenate(blocks)[:rows]

  # Shared by generation and the manipulations.

  def _map_rows(self, fn, arrays: dict[str, np.ndarray]):
    """fn(chunk split over this host's devices, first row) over every row."""
    rows = len(next(iter(arrays.values())))
    return map_batches(fn, arrays, chunk_size(rows, self.max_batch), split=True)

  def _encode_prompts(self, prompts: list[str]):
    readers = {"CLIP": self.clip.context_length,
               "the decoder": self.stages.decoder.generator.context_length}
    if self.stages.prior is not None:
      readers["the prior"] = self.stages.prior.generator.model.context_length
    return encode_prompts(self.clip.tokenizer, prompts, readers)

  def _caption_fields(self, captions, rows: int) -> dict[str, np.ndarray]:
    """The caption fields the decoder reads (`caption_fields`), [rows, ...] each:
    captions' tokens (the all-pad dropped caption for None), or for a decoder
    that reads CLIP's text outputs, those (the empty caption's for None)."""
    if captions is not None:
      captions = check_prompts(captions)
      if len(captions) not in (1, rows):
        raise UserError(f"{len(captions)} captions for {rows} images; give one, or "
                        "one per image")
    if TOKENS in self.stages.decoder.generator.caption_fields:
      if captions is None:
        return {TOKENS: np.zeros((rows, self.clip.context_length), np.int32)}
      encoded = self._encode_prompts(captions)
      tokens = np.where(encoded.unconditional[:, None], 0, encoded.tokens)
      return {TOKENS: np.broadcast_to(tokens, (rows, tokens.shape[1])).copy()}
    tokens = self.clip.tokenize([""] if captions is None else captions)
    embeddings, encodings = self._clip_text(tokens, raw=True)
    return {**_rows({TEXT_EMBEDDING: embeddings, TEXT_ENCODINGS: encodings,
                     TEXT_MASK: self.clip.text_mask(tokens)}, rows),
            **self._null_caption(rows)}

  def _null_caption(self, rows: int) -> dict[str, np.ndarray]:
    """CLIP's outputs for the empty caption, [rows, ...] each: what Karlo's
    stages are guided away from."""
    tokens = self.clip.tokenize([""])
    embedding, encodings = self._clip_text(tokens, raw=True)
    return _rows({NULL_TEXT_EMBEDDING: embedding, NULL_TEXT_ENCODINGS: encodings,
                  NULL_TEXT_MASK: self.clip.text_mask(tokens)}, rows)

  def _clip_text(self, tokens: np.ndarray, raw: bool = False
                 ) -> tuple[np.ndarray, np.ndarray]:
    """(z_t [N, D], token encodings [N, L, W]) as numpy; with `raw` z_t as the
    CLIP projects it, not normalised."""
    encode = self.clip.text_features if raw else self.clip.encode_text
    out = map_batches(
        lambda chunk, start: encode(chunk["tokens"]),
        {"tokens": tokens}, chunk_size(len(tokens), self.max_batch))
    return tuple(out)

  def _decoder_options(self, sampling: dict, clip_denoised=None) -> dict:
    decoder = self.stages.decoder
    return options.decoder_options(
        decoder.config, clip_denoised=clip_denoised,
        moments=decoder.eps_moments is not None,
        **options.of_stage("decoder", sampling))

  def _upsampler_options(self, sampling: dict) -> list[dict]:
    upsamplers = self.stages.upsamplers
    return options.upsampler_options(
        [u.config for u in upsamplers],
        moments=[u.eps_moments is not None for u in upsamplers],
        **options.of_stage("upsampler", sampling))

  def _decode(self, image_embeddings, caption: dict, noise, keys: "_Keys",
              decoder_kwargs: dict, upsampler_kwargs: list[dict], *,
              decoder_noise: dict | None = None,
              upsampler_noise: Sequence[dict] = (), **fields) -> Samples:
    """Decoder then upsamplers over rows -> Samples with `fields` added.
    `caption`: arrays [rows, ...], of which the decoder reads its
    `caption_fields`; `noise`: the decoder's x_T; `*_noise`: `_stage_noise`s."""
    decoder = self.stages.decoder

    def decode(chunk, start):
      noise = chunk.pop("noise")
      return decoder.generator.sample(
          decoder.params, chunk, jax.random.fold_in(keys.decoder, start), x_T=noise,
          **_pop_noise(chunk), **decoder_kwargs)
    images = self._map_rows(decode, {
        IMAGE_EMBEDDING: image_embeddings, "noise": noise, **(decoder_noise or {}),
        **{k: caption[k] for k in decoder.generator.caption_fields}})
    cascade = [images]
    upsampler_noise = list(upsampler_noise) + [{}] * len(self.stages.upsamplers)
    for index, (stage, kwargs) in enumerate(zip(self.stages.upsamplers,
                                                upsampler_kwargs)):
      key = jax.random.fold_in(keys.upsampler, index)
      cascade.append(self._map_rows(
          lambda chunk, start, stage=stage, kwargs=kwargs, key=key:
          stage.generator.sample(
              stage.params, {LOW_RES: jnp.clip(chunk.pop(LOW_RES), -1, 1)},
              jax.random.fold_in(key, start), **_pop_noise(chunk), **kwargs),
          {LOW_RES: cascade[-1], **upsampler_noise[index]}))
    final = np.asarray(cascade[-1], np.float32)
    cascade = tuple(images_lib.to_uint8(x) for x in cascade)
    return Samples(images=cascade[-1], cascade=cascade, final=final,
                   image_embeddings=np.asarray(image_embeddings, np.float32),
                   noise=np.asarray(noise, np.float32), **fields)


def _stage_noise(given: Mapping[str, Any] | None, stage: str, rows: int
                 ) -> dict[str, np.ndarray]:
  """A stage's `noises` entry as row-major arrays for `map_batches`: x_T [N, ...]
  and step_noise [N, K, ...] (given as [K, N, ...])."""
  if given is None:
    return {}
  unknown = set(given) - {"x_T", "steps"}
  if unknown:
    raise UserError(f"noises[{stage!r}] has {sorted(unknown)}; give x_T and/or steps")
  out = {}
  if given.get("x_T") is not None:
    out["x_T"] = np.asarray(given["x_T"], np.float32)
  if given.get("steps") is not None:
    out["step_noise"] = np.swapaxes(np.asarray(given["steps"], np.float32), 0, 1)
  for name, value in out.items():
    if value.shape[0] != rows:
      raise UserError(f"noises[{stage!r}] {name} has {value.shape[0]} rows for "
                      f"{rows} images")
  return out


def _pop_noise(chunk: dict) -> dict:
  """x_T and step_noise ([K, B, ...] again) out of a chunk, for `sample`."""
  out = {}
  if "x_T" in chunk:
    out["x_T"] = chunk.pop("x_T")
  if "step_noise" in chunk:
    out["step_noise"] = jnp.swapaxes(chunk.pop("step_noise"), 0, 1)
  return out


def _rows(arrays: dict[str, np.ndarray], rows: int) -> dict[str, np.ndarray]:
  """Each [1 or rows, ...] array as [rows, ...]."""
  return {k: np.broadcast_to(v, (rows,) + v.shape[1:]).copy()
          for k, v in arrays.items()}


class _Keys:
  """A seed's independent random streams, one per use."""

  def __init__(self, seed: int):
    if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool):
      raise UserError(f"seed must be a whole number, got {seed!r}")
    self.prior, self.noise, self.decoder, self.upsampler = jax.random.split(
        jax.random.key(int(seed)), 4)
