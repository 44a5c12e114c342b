"""One tiny trained unCLIP chain (CLIP, prior, decoder, upsampler), for tests that
sample through the whole stack.

tests/conftest.py imports the fixture, so the whole session trains it once. The
stage configs are the ones tests/stages/ train, so within one session the
persistent compilation cache serves their programs to both.
"""
import dataclasses
import os

import pytest

from configs import clip as clip_config
from configs import decoder as decoder_config
from configs import prior as prior_config
from configs import upsampler as upsampler_config


@dataclasses.dataclass(frozen=True)
class ChainWorkdirs:
  clip: str
  prior: str
  decoder: str
  upsampler: str
  tfds_dir: str

  def as_kwargs(self) -> dict:
    """The keyword arguments of UnCLIPPipeline.from_workdirs."""
    return dict(clip=self.clip, prior=self.prior, decoder=self.decoder,
                upsamplers=[self.upsampler])


def _common(config, tfds_dir):
  config.data.data_dir = tfds_dir
  config.async_checkpointing = False
  return config


def clip_tiny(tfds_dir):
  c = _common(clip_config.get_config("tiny"), tfds_dir)
  c.total_steps = c.log_every = c.eval_every = c.checkpoint_every = 2
  c.eval.num_groups = 1
  return c


def prior_tiny(tfds_dir, clip_workdir):
  c = _common(prior_config.get_config("tiny"), tfds_dir)
  c.clip_workdir = clip_workdir
  c.eval_every = c.checkpoint_every = 4
  return c


def decoder_tiny(tfds_dir, clip_workdir):
  c = _common(decoder_config.get_config("tiny"), tfds_dir)
  c.clip_workdir = clip_workdir
  return c


def upsampler_tiny(tfds_dir):
  c = _common(upsampler_config.get_config("tiny"), tfds_dir)
  c.eval_every = c.checkpoint_every = c.total_steps
  return c


def train_tiny_chain(root: str, tfds_dir: str) -> ChainWorkdirs:
  """Trains the four tiny stages into root/{clip,prior,decoder,upsampler}."""
  from unclip_jax.train import loop  # jax only after tests/conftest.py set devices
  dirs = {name: os.path.join(root, name)
          for name in ("clip", "prior", "decoder", "upsampler")}
  loop.train(clip_tiny(tfds_dir), dirs["clip"])
  loop.train(prior_tiny(tfds_dir, dirs["clip"]), dirs["prior"])
  loop.train(decoder_tiny(tfds_dir, dirs["clip"]), dirs["decoder"])
  loop.train(upsampler_tiny(tfds_dir), dirs["upsampler"])
  return ChainWorkdirs(tfds_dir=tfds_dir, **dirs)


@pytest.fixture(scope="session")
def tiny_chain(tmp_path_factory, tfds_dir) -> ChainWorkdirs:
  """Workdirs of a tiny chain: 16 px CLIP, prior, 8 px decoder, 8 -> 16 upsampler."""
  return train_tiny_chain(str(tmp_path_factory.mktemp("chain")), tfds_dir)
