"""What sampling returns: the final images and every intermediate."""
import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class Samples:
  """Rows in request order (prompt-major for text: prompt p's image k is row
  p * num_images + k; frame order for a strip)."""
  images: np.ndarray  # uint8 [N, H, W, 3]: the last stage's output
  cascade: tuple[np.ndarray, ...]  # uint8, each stage's output: decoder's first
  image_embeddings: np.ndarray  # float32 [N, D]: the z_i decoded
  noise: np.ndarray  # float32 [N, r, r, 3]: the decoder's x_T
  prompts: tuple[str, ...] | None = None  # per row, for text-to-image
  tokens: np.ndarray | None = None  # int32 [N, L]: CLIP caption tokens
  text_embeddings: np.ndarray | None = None  # float32 [N, D]: z_t
  fractions: np.ndarray | None = None  # float [N]: slerp positions of a strip
  # float32 [N, H, W, 3]: the last stage's output as sampled (about [-1, 1]),
  # before rounding to `images`.
  final: np.ndarray | None = None

  @property
  def base_images(self) -> np.ndarray:
    """uint8 [N, r, r, 3]: the decoder's images, before the upsamplers."""
    return self.cascade[0]
