"""The CLIP stage: symmetric contrastive loss over the GLOBAL batch."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax

from unclip_jax import xla_options
from unclip_jax.data import pipeline
from unclip_jax.errors import ConfigError
from unclip_jax.generators.clip import build_clip
from unclip_jax.parallel import distributed
from unclip_jax.stages.base import Stage
from unclip_jax.stages.text import tokenizer_for_workdir


def contrastive_loss(image_embedding, text_embedding, logit_scale):
  """Symmetric InfoNCE. [batch, dim] x2 -> (loss, image->text accuracy).

  Under jit with a sharded batch the [batch, batch] logits span the global
  batch: every image is contrasted with every caption on every device.
  """
  logits = logit_scale * image_embedding @ text_embedding.T
  labels = jnp.arange(logits.shape[0])
  loss_i2t = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  loss_t2i = optax.softmax_cross_entropy_with_integer_labels(logits.T, labels)
  accuracy = jnp.mean(jnp.argmax(logits, axis=1) == labels)
  return 0.5 * (loss_i2t.mean() + loss_t2i.mean()), accuracy


def retrieval_top1(image_embedding: np.ndarray, text_embedding: np.ndarray):
  """Top-1 retrieval among all N pairs: (image->text, text->image)."""
  similarity = image_embedding @ text_embedding.T
  labels = np.arange(len(similarity))
  return (float(np.mean(similarity.argmax(axis=1) == labels)),
          float(np.mean(similarity.argmax(axis=0) == labels)))


class ClipStage(Stage):
  """Trains both CLIP towers; later stages load its EMA params and tokenizer."""

  def validate(self):
    c = self.config
    if c.data.resolution % c.model.patch_size:
      raise ConfigError(f"data.resolution={c.data.resolution} is not a "
                        f"multiple of model.patch_size={c.model.patch_size}")
    for tower in ("vision", "text"):
      width, heads = c.model[f"{tower}_width"], c.model[f"{tower}_heads"]
      if width % heads:
        raise ConfigError(f"model.{tower}_width={width} does not divide into "
                          f"model.{tower}_heads={heads} heads")
    if c.eval.num_candidates < 2 or c.eval.num_groups < 1:
      raise ConfigError("eval.num_candidates must be >= 2 and "
                        "eval.num_groups >= 1")

  def prepare(self):
    c = self.config
    self.train_source = pipeline.get_data_source(c.data, c.data.train_split)
    self.eval_source = pipeline.get_data_source(c.data, c.data.eval_split)
    captions = lambda: (self.train_source[i][pipeline.CAPTION]
                        for i in range(len(self.train_source)))
    self.tokenizer = tokenizer_for_workdir(self.workdir, c.tokenizer, captions)
    self.build(None)

  def build(self, clip_sizes=None):
    del clip_sizes  # CLIP is the one that has them
    self.validate()  # config only: what compiling without data needs too
    self.model = build_clip(self.config)

  def abstract_batch(self):
    c, batch = self.config, self.config.batch_size
    side = c.data.resolution
    return {"image": jax.ShapeDtypeStruct((batch, side, side, 3), jnp.float32),
            "tokens": jax.ShapeDtypeStruct((batch, c.tokenizer.context_length),
                                           jnp.int32)}

  def _preprocess(self, record):
    tokens = self.tokenizer.encode([record[pipeline.CAPTION]])[0]
    return {"image": record[pipeline.IMAGE], "tokens": tokens}

  def init_params(self, rng):
    c = self.config
    images = jnp.zeros((1, c.data.resolution, c.data.resolution, 3))
    tokens = jnp.zeros((1, c.tokenizer.context_length), jnp.int32)
    return self.model.init(rng, images, tokens)["params"]

  def loss(self, params, batch, rng):
    del rng  # no dropout in CLIP
    z_i, z_t, scale = self.model.apply({"params": params}, batch["image"],
                                       batch["tokens"])
    loss, accuracy = contrastive_loss(z_i, z_t, scale)
    return loss, {"accuracy": accuracy, "logit_scale": scale}

  def train_iterator(self):
    return pipeline.make_train_iterator(
        self.train_source, global_batch_size=self.config.batch_size,
        seed=self.config.seed, preprocess=self._preprocess)

  @functools.cached_property
  def _encode(self):
    def encode(params, images, tokens):
      z_i, z_t, _ = self.model.apply({"params": params}, images, tokens)
      return z_i, z_t
    return xla_options.jit(encode)

  def eval_examples(self) -> list[int]:
    """A fixed random subset of the held-out split, num_groups x candidates."""
    e = self.config.eval
    needed = e.num_candidates * e.num_groups
    if len(self.eval_source) < needed:
      raise ConfigError(
          f"the {self.config.data.eval_split!r} split has "
          f"{len(self.eval_source)} examples, fewer than eval.num_candidates"
          f" x eval.num_groups = {needed}; lower them or use more data")
    order = np.random.default_rng(0).permutation(len(self.eval_source))
    return order[:needed].tolist()

  def evaluate(self, params, step):
    e = self.config.eval
    indices = self.eval_examples()
    records = [self._preprocess(self.eval_source[i]) for i in indices]
    batch = pipeline.stack_records(
        [pipeline.to_model_inputs(r) for r in records])
    i2t, t2i = [], []
    for group in range(e.num_groups):
      rows = slice(group * e.num_candidates, (group + 1) * e.num_candidates)
      z_i, z_t = distributed.to_host(self._encode(
          params, batch["image"][rows], batch["tokens"][rows]))
      group_i2t, group_t2i = retrieval_top1(z_i, z_t)
      i2t.append(group_i2t)
      t2i.append(group_t2i)
    return {"eval/i2t_top1": float(np.mean(i2t)),
            "eval/t2i_top1": float(np.mean(t2i))}
