"""Each benchmark runs at tiny size and reports what it says it does (speed is
never asserted: machines differ)."""
import math
import os
import subprocess
import sys

import pytest

from configs import clip as clip_config
from configs import decoder as decoder_config
from configs import prior as prior_config
from configs import upsampler as upsampler_config
from unclip_jax import xla_options
from unclip_jax.bench import convolutions, sampling, timing, train_step
from unclip_jax.train import peak

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _finite_and_positive(result, *keys):
  for key in keys:
    assert math.isfinite(result[key]) and result[key] > 0, (key, result[key])


def test_matmul_ceiling_counts_flops_per_second():
  assert peak.matmul_ceiling("float32", size=128, repeats=1) > 1e8
  assert set(timing.ceilings()) == {f"ceiling_gflops_{k}" for k in peak.MATMUL_KINDS}


@pytest.mark.parametrize("data", ["synthetic", "real"])
def test_train_step_on_synthetic_and_real_data(data, tfds_dir, tmp_path):
  config = upsampler_config.get_config("tiny")
  config.data.data_dir = tfds_dir
  result = train_step.bench_train_step(config, data=data, steps=2, repeats=1,
                                       workdir=str(tmp_path))
  assert result["stage"] == "upsampler" and result["data"] == data
  assert result["step_time_min"] <= result["step_time_median"] <= (
      result["step_time_max"])
  _finite_and_positive(result, "compile_seconds", "examples_per_sec",
                       "gflops_per_step_per_device", "mfu")
  assert result["mfu_against"] == "measured float32 ceiling"


def test_train_step_of_a_prior_needs_no_workdir():
  """Synthetic data: the CLIP's sizes come from its config, no CLIP is read."""
  result = train_step.bench_train_step(prior_config.get_config("tiny"),
                                       clip_config.get_config("tiny"), steps=1,
                                       repeats=1)
  _finite_and_positive(result, "step_time_median", "gflops_per_step_per_device")


def test_convolution_rates_with_and_without_our_options():
  result = convolutions.bench_convolutions(batch_size=1, repeats=1,
                                           levels=((8, 8),))
  assert result["compiler_options"] == xla_options.compiler_options()
  _finite_and_positive(result, *(f"gflops_8px_8ch_{p}_{b}"
                                 for p in ("forward", "with_gradients")
                                 for b in ("ours", "xla_default")))


@pytest.mark.parametrize("config", [prior_config, decoder_config, upsampler_config],
                         ids=["prior", "decoder", "upsampler"])
def test_every_sampler(config):
  result = sampling.bench_sampling(config.get_config("tiny"),
                                   clip_config.get_config("tiny"), batch_size=8,
                                   num_steps=2, repeats=1)
  _finite_and_positive(result, "seconds_per_item", "gflops_per_call", "mfu")
  assert result["sampling_steps"] == 2


def test_the_command_line_prints_one_json_line_or_one_error_line():
  env = {**os.environ, "XLA_FLAGS": ""}
  done = subprocess.run([sys.executable, "-m", "unclip_jax.bench", "nonsense"],
                        cwd=ROOT, capture_output=True, text=True, env=env,
                        timeout=120)
  assert done.returncode == 2
  assert done.stderr.strip().splitlines()[-1].startswith(
      "error: unknown benchmark 'nonsense'")
