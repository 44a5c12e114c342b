"""The upsampler stage: end to end through the loop, full-resolution sampling of a
crop-trained model, the eps moments of the last evaluation, rng-determined
degradations, and one-line config errors."""
import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from configs import upsampler as upsampler_config
from unclip_jax.errors import ConfigError
from unclip_jax import generators
from unclip_jax.generators import upsampler as upsampler_lib
from unclip_jax.stages.upsampler import UpsamplerStage
from unclip_jax.train import loop
from unclip_jax.train.metrics import read_metrics


def _random_params(upsampler, seed=0):
  """Numpy-drawn params (no init to compile), nonzero everywhere."""
  abstract = nn.unbox(jax.eval_shape(upsampler.init_params, jax.random.key(0)))
  rng = np.random.default_rng(seed)
  return jax.tree.map(
      lambda leaf: jnp.asarray(rng.normal(0, 0.1, leaf.shape), leaf.dtype), abstract)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tfds_dir):
  c = upsampler_config.get_config("tiny")
  c.data.data_dir = tfds_dir
  c.async_checkpointing = False
  c.eval_every = c.checkpoint_every = c.total_steps
  workdir = str(tmp_path_factory.mktemp("upsampler"))
  return c, workdir, loop.train(c, workdir)


def test_end_to_end_writes_metrics_and_samples(trained):
  config, workdir, metrics = trained
  names = set().union(*read_metrics(workdir))
  assert {"train/loss", "eval/loss", "eval/psnr", "eval/psnr_bilinear"} <= names
  for name in ("eval/loss", "eval/psnr", "eval/psnr_bilinear"):
    assert np.isfinite(metrics[name]), name
  # Bilinear upsampling of a blurred emoji scene is already close to the truth.
  assert metrics["eval/psnr_bilinear"] > 15
  path = os.path.join(workdir, "samples", f"step_{config.total_steps}.png")
  grid = np.asarray(Image.open(path))
  rows, side = config.eval.num_samples, config.data.resolution
  assert grid.shape[0] >= rows * side and grid.shape[1] >= 4 * side


def test_trained_model_upsamples_at_full_resolution(trained):
  config, workdir, _ = trained
  trained = generators.load(workdir, "upsampler")
  assert trained.step == config.total_steps
  crop = upsampler_lib.crop_size(trained.config)
  low_res = jnp.zeros((2, config.model.low_res, config.model.low_res, 3))
  out = trained.generator.sample(trained.params, {"low_res": low_res},
                                 jax.random.key(0), num_steps=2)
  assert crop < config.data.resolution  # trained on crops...
  assert out.shape == (2, config.data.resolution, config.data.resolution, 3)
  assert np.isfinite(np.asarray(out)).all()  # ...sampled at full size


def test_the_last_evaluation_writes_the_eps_moments(trained):
  config, workdir, _ = trained
  with open(os.path.join(workdir, "eps_moments.json")) as f:
    record = json.load(f)
  grid = config.sample.moments_timesteps
  assert record["timesteps"][0] == 0 and record["timesteps"][-1] == 999
  assert len(record["eps_moments"]) == len(record["timesteps"]) == grid
  assert record["step"] == config.total_steps
  assert record["num_examples"] == min(config.sample.moments_examples,
                                       config.eval.num_examples)
  assert np.all(np.isfinite(record["eps_moments"]))
  assert not os.path.exists(os.path.join(workdir, "eps_moments.json.tmp"))
  loaded = generators.load(workdir, "upsampler")
  assert loaded.generator.eps_moments.values == tuple(record["eps_moments"])
  low_res = jnp.zeros((2, config.model.low_res, config.model.low_res, 3))
  out = loaded.generator.sample(loaded.params, {"low_res": low_res},
                                jax.random.key(0), num_steps=2,
                                sampler="analytic")
  assert np.isfinite(np.asarray(out)).all()


def test_multilevel_unet_samples_beyond_its_crop_size():
  c = upsampler_config.get_config("tiny")
  c.model.channel_mults = (1, 2)  # down- and upsampling: sides must divide by 2
  upsampler = upsampler_lib.Upsampler(c)
  params = _random_params(upsampler)
  low_res = jnp.asarray(np.random.default_rng(1).uniform(-1, 1, (2, 12, 12, 3)),
                        jnp.float32)
  # 24 px out: larger than the 8 px training crops and the 16 px data side.
  out = upsampler.sample(params, {"low_res": low_res}, jax.random.key(0),
                         num_steps=2)
  assert out.shape == (2, 24, 24, 3)
  assert np.isfinite(np.asarray(out)).all()


def test_loss_inputs_are_determined_by_the_rng():
  c = upsampler_config.get_config("tiny")
  c.model.degradation = "bsr"  # rng-driven, unlike blur
  c.model.low_res_noise = 0.2
  upsampler = upsampler_lib.Upsampler(c)
  images = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (4, 16, 16, 3)),
                       jnp.float32)
  pair = jax.jit(upsampler.training_pair)
  first = jax.device_get(pair(jax.random.key(3), images))
  again = jax.device_get(pair(jax.random.key(3), images))
  other = jax.device_get(pair(jax.random.key(4), images))
  crop = upsampler_lib.crop_size(c)
  for a, b, o in zip(first, again, other):
    assert a.shape == (4, crop, crop, 3)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, o)


def test_crops_are_aligned_between_target_and_low_res():
  c = upsampler_config.get_config("tiny")
  c.model.low_res_noise = 0.0
  upsampler = upsampler_lib.Upsampler(c)
  images = np.random.default_rng(0).uniform(-1, 1, (4, 16, 16, 3)).astype(np.float32)
  target, low_res = jax.device_get(jax.jit(upsampler.training_pair)(
      jax.random.key(0), jnp.asarray(images)))
  full = np.asarray(jax.image.resize(upsampler.degrade(None, images),
                                     images.shape, "bilinear"))
  crop = upsampler_lib.crop_size(c)
  offsets = set()
  for b in range(len(images)):
    # Where the target crop came from, found by its pixels...
    (top, left), = [(i, j) for i in range(17 - crop) for j in range(17 - crop)
                    if np.array_equal(images[b, i:i + crop, j:j + crop], target[b])]
    offsets.add((top, left))
    # ...is where the low-res crop came from too.
    np.testing.assert_allclose(low_res[b], full[b, top:top + crop, left:left + crop],
                               atol=1e-6)
  assert len(offsets) > 1  # a window per example


@pytest.mark.parametrize("overrides, message", [
    ({"model.low_res": 6}, "not an integer multiple"),
    ({"model.low_res": 16}, "not an integer multiple"),
    ({"model.crop_fraction": 0.3}, "not a whole number"),
    ({"model.crop_fraction": 0.375, "model.channel_mults": (1, 2, 2, 2)},
     "crop side"),
    ({"data.resolution": 20, "model.low_res": 10, "model.crop_fraction": 0.4,
      "model.channel_mults": (1, 2, 2, 2)}, "data.resolution = 20"),
    ({"model.degradation": "jpeg"}, "model.degradation"),
    ({"diffusion.parameterization": "mu"}, "diffusion.parameterization"),
    ({"sample.num_steps": 0}, "sample.num_steps"),
])
def test_bad_configs_fail_with_one_line(overrides, message):
  c = upsampler_config.get_config("tiny")
  for dotted, value in overrides.items():
    section, field = dotted.split(".")
    c[section][field] = value
  with pytest.raises(ConfigError, match=message) as error:
    UpsamplerStage(c, "unused").validate()
  assert "\n" not in str(error.value)


@pytest.mark.parametrize("preset", ["tiny", "demo", "paper", "paper_1024"])
def test_presets_are_valid(preset):
  upsampler_lib.validate_config(upsampler_config.get_config(preset))
