"""Test set-up: 8 fake CPU devices, set before jax is imported anywhere."""
import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ["JAX_PLATFORMS"] = "cpu"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import tempfile  # noqa: E402

import jax  # noqa: E402  (after the environment above, on purpose)
import pytest  # noqa: E402

# One tiny trained chain for the session, shared by tests/pipeline and
# tests/test_bad_inputs.py.
from tests.chain import tiny_chain  # noqa: E402,F401  (a fixture, re-exported)

# Tests train the same tiny programs more than once (kill + resume, several
# stages on one CLIP): a persistent compilation cache compiles each once.
jax.config.update("jax_compilation_cache_dir",
                  os.environ.get("UNCLIP_TEST_COMPILE_CACHE",
                                 tempfile.mkdtemp(prefix="unclip_jax_cache_")))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


@pytest.fixture(scope="session")
def tfds_dir(tmp_path_factory):
  """One data_dir for the whole session: bundled builders are built once."""
  return str(tmp_path_factory.mktemp("tensorflow_datasets"))


@pytest.fixture(scope="session")
def pipe(tiny_chain):  # pylint: disable=redefined-outer-name
  """A pipeline on the tiny chain: each sampler compiles once per shape for the
  session (max_batch=8 on the 8 test devices: every request runs in chunks of
  8 rows)."""
  from unclip_jax import UnCLIPPipeline
  return UnCLIPPipeline.from_workdirs(**tiny_chain.as_kwargs(), max_batch=8)
