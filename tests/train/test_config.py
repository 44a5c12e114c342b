"""The config system: presets, command-line overrides, one-line errors."""
import importlib
import os
import subprocess
import sys

import jax
import pytest
from absl import flags
from ml_collections import config_flags

from configs import clip as clip_config
from unclip_jax.errors import ConfigError, WorkdirError
from unclip_jax.stages.clip import ClipStage
from unclip_jax.train import config_checks

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(__file__)))


def _parse(monkeypatch, *overrides):
  argv = ["prog", f"--config={ROOT}/configs/clip.py:tiny", *overrides]
  monkeypatch.setattr(sys, "argv", argv)  # config_flags reads overrides here
  flag_values = flags.FlagValues()
  config_flags.DEFINE_config_file("config", flag_values=flag_values)
  flag_values(argv)
  return flag_values.config


def test_presets_have_the_contract_fields():
  for preset in ("tiny", "demo", "paper"):
    c = clip_config.get_config(preset)
    for field in ("seed", "total_steps", "batch_size", "log_every",
                  "eval_every", "checkpoint_every", "mesh", "optim", "data"):
      assert field in c, (preset, field)
    for field in ("lr", "schedule", "weight_decay", "grad_clip"):
      assert field in c.optim


def test_train_help_lists_every_preset_and_the_override_syntax():
  usage = subprocess.run([sys.executable, "-m", "unclip_jax.train", "--help"],
                         cwd=ROOT, capture_output=True, text=True, check=False,
                         timeout=60).stdout
  for stage in ("clip", "prior", "decoder", "upsampler"):
    module = importlib.import_module(f"configs.{stage}")
    assert f"configs/{stage}.py: {', '.join(module.PRESETS)}" in usage
    for preset in module.PRESETS:  # each listed preset loads
      assert module.get_config(preset).stage == stage
  assert "--config.<field>=<value>" in usage and "--config.optim.lr=3e-4" in usage


def test_command_line_overrides_any_leaf(monkeypatch):
  c = _parse(monkeypatch, "--config.optim.lr=0.125", "--config.mesh.shape=(2,2,2)",
             "--config.data.num_emoji=4", "--config.data.download=True",
             "--config.model.remat_policy=full")
  assert c.optim.lr == 0.125
  assert tuple(c.mesh.shape) == (2, 2, 2)
  assert c.data.num_emoji == 4
  assert c.data.download is True and c.model.remat_policy == "full"  # docs name them
  assert c.total_steps == clip_config.get_config("tiny").total_steps


@pytest.mark.parametrize("field,value,message", [
    ("total_steps", 0, "total_steps=0 must be > 0"),
    ("batch_size", 12, "does not divide over 8 data-parallel shards"),
    ("dtype", "float16", "use one of ['bfloat16', 'float32']"),
    ("mesh.shape", (3, 1, 1), "does not divide 8 devices"),
    ("mesh.shape", (-1, -1, 1), "at most one -1"),
    ("optim.ema_decay", 1.0, "must be in [0, 1)"),
    ("model.remat_policy", "most", "use one of none, full, dots"),
])
def test_invalid_common_values_fail_with_one_line(field, value, message):
  c = clip_config.get_config("tiny")
  c.unlock()
  parent, _, leaf = field.rpartition(".")
  (c[parent] if parent else c)[leaf] = value
  with pytest.raises(ConfigError) as error:
    config_checks.check_common(c)
  assert message in str(error.value)
  assert "\n" not in str(error.value)


def test_stage_checks_its_own_values(tmp_path):
  c = clip_config.get_config("tiny")
  c.model.patch_size = 5
  with pytest.raises(ConfigError, match="not a multiple of model.patch_size"):
    ClipStage(c, str(tmp_path)).validate()


def test_workdir_of_another_model_is_refused(tmp_path):
  c = clip_config.get_config("tiny")
  config_checks.prepare_workdir(c, str(tmp_path))
  assert (tmp_path / "config.json").exists()
  c.total_steps = 100  # training longer on the same workdir is fine
  config_checks.prepare_workdir(c, str(tmp_path))
  c.model.vision_width = 64
  with pytest.raises(WorkdirError, match="different model"):
    config_checks.prepare_workdir(c, str(tmp_path))


def test_cli_prints_one_line_and_exits_2(tmp_path):
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8")
  result = subprocess.run(
      [sys.executable, "-m", "unclip_jax.train",
       "--config=configs/clip.py:tiny", "--config.mesh.shape=(3,1,1)",
       f"--workdir={tmp_path}/w"], cwd=ROOT, env=env, capture_output=True,
      text=True, timeout=120)
  assert result.returncode == 2
  last = result.stderr.strip().splitlines()[-1]
  assert last.startswith("error: mesh shape (3, 1, 1) does not divide 8")
  assert "Traceback" not in result.stderr
  assert jax.device_count() == 8
