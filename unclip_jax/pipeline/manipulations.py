"""The paper's image manipulations (DALL-E 2 §3), as methods of UnCLIPPipeline:
variations, DDIM inversion, interpolations and text diffs. Each is a new choice
of the decoder's z_i and x_T; the decoder (DDIM, whatever its config's sampler:
inversion is DDIM's ODE) and the upsamplers do the rest. Every method takes the
pipeline's decoder_steps / decoder_guidance / decoder_threshold and upsampler_*
options (docs/sampling.md)."""
import dataclasses
from typing import Any, Sequence

import numpy as np

from unclip_jax.errors import UserError
from unclip_jax.data import images as images_lib
from unclip_jax.generators.base import IMAGE_EMBEDDING
from unclip_jax.pipeline import options
from unclip_jax.pipeline.results import Samples

LATENTS = ("fixed", "inverted")  # interpolate's x_T
VARIATION_LATENTS = ("inverted", "random")  # variations' x_T
# The options a manipulation passes on (it fixes the decoder's sampler itself).
_STRIP_OPTIONS = options.DECODER + options.UPSAMPLER


def slerp(a: np.ndarray, b: np.ndarray, fractions: Sequence[float]) -> np.ndarray:
  """Spherical interpolation from a to b ([...] each, flattened for the angle):
  [len(fractions), ...]; fraction 0 is a, 1 is b. Unit vectors stay unit."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  fractions = np.asarray(fractions, np.float64).reshape((-1,) + (1,) * a.ndim)
  cosine = np.sum(a * b) / max(np.linalg.norm(a) * np.linalg.norm(b), 1e-12)
  theta = np.arccos(np.clip(cosine, -1.0, 1.0))
  if theta < 1e-6:  # (nearly) the same direction: slerp is lerp
    return ((1 - fractions) * a + fractions * b).astype(np.float32)
  return ((np.sin((1 - fractions) * theta) * a + np.sin(fractions * theta) * b)
          / np.sin(theta)).astype(np.float32)


def _one_image(image: Any, what: str) -> np.ndarray:
  found = images_lib.as_image_list(image)
  if len(found) != 1:
    raise UserError(f"{what} takes one image, got {len(found)}")
  return images_lib.square_image(found[0])


class Manipulations:
  """Mixed into UnCLIPPipeline (uses its encoders, `noise` and `_decode`)."""

  def variations(self, image: Any, num_images: int = 4, eta: float = 1.0,
                 seed: int = 0, *, latents: str = "inverted",
                 caption: str | None = None, **sampling) -> Samples:
    """`num_images` images of the image's CLIP embedding z_i, decoded by DDIM
    at `eta` (§3.1). `latents`: "inverted" (the paper's: x_T is the image's own
    DDIM inversion under z_i and `caption`, so eta > 0 and the seed make the
    variety, and eta=0 gives the image's reconstruction) or "random" (x_T from
    seed). `caption`: an optional caption for the decoder (default: none)."""
    sampling = options.check_names("variations", sampling, _STRIP_OPTIONS,
                                   options.DECODER_SAMPLER)
    if latents not in VARIATION_LATENTS:
      raise UserError(f"latents={latents!r}: use one of {VARIATION_LATENTS}")
    eta = options.number("eta", eta, minimum=0.0)
    square = _one_image(image, "variations")
    z_i = self.encode_images(square)
    num_images = options.count("num_images", num_images)
    noise = None
    if latents == "inverted":
      noise = np.repeat(self.invert(square, caption=caption,
                                    **_inversion_options(sampling))[None],
                        num_images, axis=0)
    return self.decode(np.repeat(z_i, num_images, axis=0), captions=caption,
                       noise=noise, seed=seed, decoder_sampler="ddim",
                       decoder_eta=eta, **sampling)

  def invert(self, image: Any, *, caption: str | None = None,
             decoder_steps: int | None = None, decoder_guidance: float | None = None,
             fixed_point_iterations: int = 2) -> np.ndarray:
    """x_T of the decoder's DDIM ODE run forwards from the image (or a list:
    one x_T each), conditioned on its z_i: float32 [r, r, 3] ([N, r, r, 3] for a
    list). `pipe.decode(pipe.encode_images(image), noise=x_T, decoder_eta=0)`
    with the same caption, steps and guidance gives the image back (at the
    decoder's resolution)."""
    squares = [images_lib.square_image(i) for i in images_lib.as_image_list(image)]
    kwargs = options.decoder_options(
        self.stages.decoder.config, steps=decoder_steps, guidance=decoder_guidance,
        sampler="ddim", eta=0.0)
    if fixed_point_iterations != 0:
      fixed_point_iterations = options.count("fixed_point_iterations",
                                             fixed_point_iterations)
    decoder = self.stages.decoder

    def invert(chunk, start):
      del start
      pixels = chunk.pop("pixels")
      return decoder.generator.invert(
          decoder.params, chunk, pixels, num_steps=kwargs["num_steps"],
          guidance_scale=kwargs["guidance_scale"],
          fixed_point_iterations=fixed_point_iterations)
    x_T = self._map_rows(invert, {
        IMAGE_EMBEDDING: self.encode_images(squares),
        **self._caption_fields(caption, len(squares)),
        "pixels": images_lib.at_resolution(squares, self.base_resolution)})
    single = not isinstance(image, (list, tuple)) and not (
        isinstance(image, np.ndarray) and image.ndim == 4)
    return x_T[0] if single else x_T

  def interpolate(self, image_a: Any, image_b: Any, num_steps: int = 5, *,
                  latents: str = "fixed", seed: int = 0, caption: str | None = None,
                  **sampling) -> Samples:
    """A strip of `num_steps` images slerping z_i from image_a's to image_b's
    (§3.2). `latents`: "fixed" (one x_T from seed for every frame) or
    "inverted" (x_T slerped between the images' DDIM inversions, so the ends
    reconstruct the inputs)."""
    sampling = options.check_names("interpolate", sampling, _STRIP_OPTIONS,
                                   options.DECODER_SAMPLER)
    if latents not in LATENTS:
      raise UserError(f"latents={latents!r}: use one of {LATENTS}")
    num_steps = options.count("num_steps", num_steps)
    pair = [_one_image(image_a, "interpolate"), _one_image(image_b, "interpolate")]
    embeddings = self.encode_images(pair)
    fractions = np.linspace(0.0, 1.0, num_steps)
    if latents == "inverted":
      ends = self.invert(pair, caption=caption, **_inversion_options(sampling))
      noise, clip_denoised = slerp(ends[0], ends[1], fractions), False
    else:
      noise = np.repeat(self.noise(seed, 1), num_steps, axis=0)
      clip_denoised = bool(self.stages.decoder.config.sample.clip_denoised)
    return self._strip(slerp(embeddings[0], embeddings[1], fractions), noise,
                       fractions, caption, seed, sampling, clip_denoised)

  def text_diff(self, image: Any, from_caption: str, to_caption: str,
                num_steps: int = 5, max_theta: float = 0.5, *, seed: int = 0,
                caption: str | None = None, **sampling) -> Samples:
    """A strip of `num_steps` edits of the image: z_i slerped toward the text
    diff normalize(z_t(to_caption) - z_t(from_caption)) by fractions 0 ...
    `max_theta` (§3.3), each decoded from the image's inverted x_T, so frame 0
    reconstructs it."""
    sampling = options.check_names("text_diff", sampling, _STRIP_OPTIONS,
                                   options.DECODER_SAMPLER)
    num_steps = options.count("num_steps", num_steps)
    if not 0.0 <= float(max_theta) <= 1.0:
      raise UserError(f"max_theta={max_theta}: must be in [0, 1] (a slerp "
                      "fraction; the paper uses up to 0.5)")
    square = _one_image(image, "text_diff")
    z_from, z_to = self.encode_text([from_caption, to_caption])
    diff = z_to - z_from
    if np.linalg.norm(diff) < 1e-6:
      raise UserError(f"{from_caption!r} and {to_caption!r} have the same CLIP "
                      "text embedding: there is no direction to move in")
    fractions = np.linspace(0.0, float(max_theta), num_steps)
    noise = self.invert(square, caption=caption, **_inversion_options(sampling))
    return self._strip(
        slerp(self.encode_images(square)[0], diff / np.linalg.norm(diff), fractions),
        np.repeat(noise[None], num_steps, axis=0), fractions, caption, seed,
        sampling, clip_denoised=False)

  def _strip(self, embeddings, noise, fractions, caption, seed, sampling,
             clip_denoised) -> Samples:
    """Decodes a strip's frames by DDIM at eta=0: every frame is a function of
    its z_i and x_T."""
    samples = self.decode(embeddings, captions=caption, noise=noise, seed=seed,
                          decoder_sampler="ddim", decoder_eta=0.0,
                          clip_denoised=clip_denoised, **sampling)
    return dataclasses.replace(samples, fractions=np.asarray(fractions, np.float32))


def _inversion_options(sampling: dict) -> dict:
  """The decoder options `invert` shares with the decode that follows it."""
  return {k: sampling.get(k) for k in ("decoder_steps", "decoder_guidance")}
