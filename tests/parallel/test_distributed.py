"""Multi-host start-up: which environments start jax.distributed, and one-line
errors for a half-configured coordinator. On one machine it is a no-op."""
import jax
import pytest

from configs import common
from unclip_jax.errors import ConfigError
from unclip_jax.parallel import distributed


@pytest.mark.parametrize("environ, expected", [
    ({}, None),
    ({"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234"}, "coordinator"),
    # Inside `srun` with several tasks; not the batch script around it.
    ({"SLURM_JOB_ID": "7", "SLURM_STEP_ID": "0", "SLURM_STEP_NUM_TASKS": "16"},
     "slurm"),
    ({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "16"}, None),
    ({"SLURM_JOB_ID": "7", "SLURM_STEP_ID": "0", "SLURM_STEP_NUM_TASKS": "1"},
     None),
    ({"OMPI_COMM_WORLD_SIZE": "4"}, "openmpi"),
])
def test_detects_multi_process_environments(environ, expected):
  assert distributed.detect(environ) == expected


def test_one_machine_is_left_alone():
  config = common.base_config("clip")
  distributed.initialize(config)  # "auto", nothing detected here
  assert not jax.distributed.is_initialized()
  assert jax.process_count() == 1


def test_bad_settings_are_one_line_errors():
  config = common.base_config("clip")
  config.distributed.initialize = "maybe"
  with pytest.raises(ConfigError, match="use one of"):
    distributed.initialize(config)
  config.distributed.initialize = "auto"
  config.distributed.coordinator_address = "10.0.0.1:1234"
  with pytest.raises(ConfigError, match="also set distributed.num_processes "
                     "and distributed.process_id"):
    distributed.initialize(config)
