"""The tiny chain's training records for the pipeline tests (the chain and the
`pipe` on it are session fixtures of tests/conftest.py)."""
import pytest


@pytest.fixture(scope="session")
def training_records(tiny_chain):
  """The first records of the chain's training split (16 px scenes, captions)."""
  from tests import chain
  from unclip_jax.data import pipeline
  config = chain.clip_tiny(tiny_chain.tfds_dir)
  source = pipeline.get_data_source(config.data, config.data.train_split)
  return [source[i] for i in range(4)]
