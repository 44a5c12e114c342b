"""Low-resolution inputs for the upsamplers: blur (64->256) and BSR-like (256->1024).

DALL-E 2 (App. C) degrades the upsamplers' conditioning image: a gaussian blur
(kernel 3, sigma 0.6, after Saharia et al.) for the first stage, and a BSR
degradation (after Rombach et al. / Zhang et al.'s BSRGAN) for the second.
Pure jax functions of (rng, images): images are float [batch, height, width, 3]
in [-1, 1]; the same rng gives the same result. Each image draws its own
degradation parameters and op order.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np

BSR_OPS = ("blur", "noise", "resize", "jpeg")

# JPEG (ITU T.81 Annex K) quantisation tables, luminance and chrominance.
_JPEG_LUMA = np.array([
    [16, 11, 10, 16, 24, 40, 51, 61], [12, 12, 14, 19, 26, 58, 60, 55],
    [14, 13, 16, 24, 40, 57, 69, 56], [14, 17, 22, 29, 51, 87, 80, 62],
    [18, 22, 37, 56, 68, 109, 103, 77], [24, 35, 55, 64, 81, 104, 113, 92],
    [49, 64, 78, 87, 103, 121, 120, 101], [72, 92, 95, 98, 112, 100, 103, 99]],
                      np.float32)
_JPEG_CHROMA = np.full((8, 8), 99, np.float32)
_JPEG_CHROMA[:4, :4] = [[17, 18, 24, 47], [18, 21, 26, 66], [24, 26, 56, 99],
                        [47, 66, 99, 99]]
_RGB_TO_YCC = np.array([[0.299, 0.587, 0.114], [-0.168736, -0.331264, 0.5],
                        [0.5, -0.418688, -0.081312]], np.float32)


def _dct_matrix(n: int = 8) -> np.ndarray:
  """Orthonormal DCT-II matrix: coefficients = D @ block @ D.T."""
  k, x = np.arange(n)[:, None], np.arange(n)[None]
  d = np.cos(np.pi * (2 * x + 1) * k / (2 * n)) * np.sqrt(2 / n)
  d[0] /= np.sqrt(2)
  return d.astype(np.float32)


def _gaussian_kernel(kernel_size: int, sigma) -> jax.Array:
  """Normalised 1-D gaussian taps [..., kernel_size]; sigma scalar or [batch]."""
  offsets = jnp.arange(kernel_size, dtype=jnp.float32) - (kernel_size - 1) / 2
  sigma = jnp.asarray(sigma, jnp.float32)[..., None]
  taps = jnp.exp(-0.5 * (offsets / sigma)**2)
  return taps / taps.sum(-1, keepdims=True)


def gaussian_blur(images: jax.Array, kernel_size: int = 3,
                  sigma: float | jax.Array = 0.6) -> jax.Array:
  """Separable gaussian blur with reflected borders.

  images [batch, height, width, channels]; sigma a scalar or one per image.
  """
  images = jnp.asarray(images, jnp.float32)
  taps = _gaussian_kernel(kernel_size, sigma)
  taps = jnp.broadcast_to(taps, (images.shape[0], kernel_size))[:, :, None, None, None]
  pad = kernel_size // 2
  height, width = images.shape[1:3]
  x = jnp.pad(images, ((0, 0), (pad, pad), (0, 0), (0, 0)), mode="reflect")
  x = sum(taps[:, i] * x[:, i:i + height] for i in range(kernel_size))
  x = jnp.pad(x, ((0, 0), (0, 0), (pad, pad), (0, 0)), mode="reflect")
  return sum(taps[:, i] * x[:, :, i:i + width] for i in range(kernel_size))


def _rescale(image: jax.Array, scale, method: str) -> jax.Array:
  """Resamples [h, w, c] by `scale` about the top-left corner, same array shape."""
  return jax.image.scale_and_translate(
      image, image.shape, (0, 1), jnp.stack([scale, scale]), jnp.zeros(2),
      method, antialias=True)


def _resize_down_up(image: jax.Array, u: jax.Array) -> jax.Array:
  """Downscale by a random factor in [1/2, 1) and back, random methods."""
  scale = 0.5 + 0.5 * u[0]
  small = jnp.stack([_rescale(image, scale, m) for m in ("linear", "cubic", "area")])
  small = small[jnp.minimum((u[1] * 3).astype(jnp.int32), 2)]
  # Pixels past the small image's extent come out zero: repeat its last
  # valid row / column so the upscale does not bleed black into the border.
  height, width = image.shape[:2]
  last_row = jnp.floor(height * scale - 0.5).astype(jnp.int32)
  last_col = jnp.floor(width * scale - 0.5).astype(jnp.int32)
  small = small[jnp.minimum(jnp.arange(height), last_row)]
  small = small[:, jnp.minimum(jnp.arange(width), last_col)]
  return jnp.where(u[2] < 0.5, _rescale(small, 1 / scale, "cubic"),
                   _rescale(small, 1 / scale, "linear"))


def _jpeg(image: jax.Array, u: jax.Array) -> jax.Array:
  """JPEG-like compression: YCbCr, 8x8 block DCT, quantisation at quality 30-95."""
  quality = 30.0 + 65.0 * u[0]
  height, width = image.shape[:2]
  rgb = (image + 1) * 127.5
  ycc = rgb @ _RGB_TO_YCC.T + jnp.array([-128.0, 0.0, 0.0])
  pad_h, pad_w = -height % 8, -width % 8
  ycc = jnp.pad(ycc, ((0, pad_h), (0, pad_w), (0, 0)), mode="edge")
  blocks = ycc.reshape(ycc.shape[0] // 8, 8, ycc.shape[1] // 8, 8, 3)
  dct = jnp.asarray(_dct_matrix())
  coeffs = jnp.einsum("uh,ahbwc,vw->aubvc", dct, blocks, dct)
  # IJG quality scaling of the standard tables.
  factor = jnp.where(quality < 50, 5000 / quality, 200 - 2 * quality)
  tables = jnp.stack([jnp.asarray(_JPEG_LUMA)] + [jnp.asarray(_JPEG_CHROMA)] * 2, -1)
  tables = jnp.clip(jnp.floor((tables * factor + 50) / 100), 1, 255)[None, :, None]
  coeffs = jnp.round(coeffs / tables) * tables
  ycc = jnp.einsum("uh,aubvc,vw->ahbwc", dct, coeffs, dct).reshape(ycc.shape)
  ycc = ycc[:height, :width] + jnp.array([128.0, 0.0, 0.0])
  rgb = ycc @ np.linalg.inv(_RGB_TO_YCC).T
  return rgb / 127.5 - 1


def _blur(image: jax.Array, u: jax.Array) -> jax.Array:
  return gaussian_blur(image[None], kernel_size=13, sigma=0.2 + 1.8 * u[0])[0]


def _downsample(images: jax.Array, scale: int, method: str) -> jax.Array:
  batch, height, width, channels = images.shape
  if height % scale or width % scale:
    raise ValueError(f"image sides ({height}, {width}) not divisible by {scale}")
  return jax.image.resize(images, (batch, height // scale, width // scale, channels),
                          method, antialias=True)


def _bsr_one(rng, image: jax.Array, scale: int) -> jax.Array:
  # Two random draws per image (each jax.random call costs compile time):
  # uniforms for every parameter and the op order, and the noise field.
  uniform_key, noise_key = jax.random.split(rng)
  u = jax.random.uniform(uniform_key, (11,))
  order = jnp.argsort(u[:len(BSR_OPS)])
  # 1 to 25 levels of 255, on the [-1, 1] scale.
  noise = (1 + 24 * u[4]) * 2 / 255 * jax.random.normal(noise_key, image.shape)
  branches = [
      lambda x: _blur(x, u[5:6]),
      lambda x: x + noise,
      lambda x: _resize_down_up(x, u[6:9]),
      lambda x: _jpeg(x, u[9:10]),
  ]
  # A loop, not 4 unrolled switches: each op is compiled once.
  image = jax.lax.fori_loop(
      0, len(BSR_OPS),
      lambda step, x: jnp.clip(jax.lax.switch(order[step], branches, x), -1, 1),
      image)
  image = jnp.where(u[10] < 0.5, _downsample(image[None], scale, "cubic"),
                    _downsample(image[None], scale, "linear"))[0]
  return jnp.clip(image, -1, 1)


@functools.partial(jax.jit, static_argnames=("scale",))
def bsr_degrade(rng: jax.Array, images: jax.Array, scale: int) -> jax.Array:
  """BSR-like degradation, then downsampling by `scale`.

  Per image, in a random order: gaussian blur (sigma 0.2-2), additive gaussian
  noise (1-25 of 255 levels), a down-then-up resize by a random factor in
  [1/2, 1) with random methods, and JPEG-like compression (quality 30-95); then
  a linear or cubic antialiased downsample by `scale`.
  images [batch, H, W, 3] in [-1, 1] -> [batch, H / scale, W / scale, 3].
  """
  images = jnp.asarray(images, jnp.float32)
  keys = jax.random.split(rng, images.shape[0])
  return jax.vmap(functools.partial(_bsr_one, scale=scale))(keys, images)


@functools.partial(jax.jit, static_argnames=("scale",))
def blur_degrade(images: jax.Array, scale: int) -> jax.Array:
  """Gaussian blur (kernel 3, sigma 0.6), then a cubic antialiased downsample."""
  images = jnp.asarray(images, jnp.float32)
  return jnp.clip(_downsample(gaussian_blur(images, 3, 0.6), scale, "cubic"), -1, 1)


def degrade(rng: jax.Array | None, images: jax.Array, kind: str,
            scale: int) -> jax.Array:
  """The upsampler's low-res input [batch, H / scale, W / scale, 3] in [-1, 1].

  kind 'blur' (64->256 stage): `blur_degrade`, rng unused; kind 'bsr'
  (256->1024 stage): `bsr_degrade`. Jittable with kind and scale static.
  """
  if kind == "blur":
    return blur_degrade(images, scale)
  if kind == "bsr":
    return bsr_degrade(rng, images, scale)
  raise ValueError(f"unknown degradation kind {kind!r}: use 'blur' or 'bsr'")
