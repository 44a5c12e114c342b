"""One tiny trained chain and one pipeline on it for every pipeline test: each
sampler compiles once per shape for the session (max_batch=8 on the 8 test
devices: every request runs in chunks of 8 rows)."""
import pytest

from tests.chain import tiny_chain  # noqa: F401  (a fixture, re-exported)


@pytest.fixture(scope="session")
def pipe(tiny_chain):  # pylint: disable=redefined-outer-name
  from unclip_jax import UnCLIPPipeline
  return UnCLIPPipeline.from_workdirs(**tiny_chain.as_kwargs(), max_batch=8)


@pytest.fixture(scope="session")
def training_records(tiny_chain):  # pylint: disable=redefined-outer-name
  """The first records of the chain's training split (16 px scenes, captions)."""
  from tests import chain
  from unclip_jax.data import pipeline
  config = chain.clip_tiny(tiny_chain.tfds_dir)
  source = pipeline.get_data_source(config.data, config.data.train_split)
  return [source[i] for i in range(4)]
