"""Every sampler (ddim, ddpm, analytic) through every generator, on tiny random
params; the sample.* config checks; the stored eps moments and their
interpolation to any respacing."""
import flax.linen as nn
import jax
import numpy as np
import pytest

from configs import clip as clip_config
from configs import decoder as decoder_config
from configs import prior as prior_config
from configs import upsampler as upsampler_config
from unclip_jax import diffusion
from unclip_jax.errors import ConfigError, UserError
from unclip_jax.generators import common, generator_class
from unclip_jax.generators.base import ClipSizes, EpsMoments
from unclip_jax.sample import __main__ as sample_cli

CONFIGS = {"prior": prior_config, "decoder": decoder_config,
           "upsampler": upsampler_config}
ROWS = 2


def _random_params(generator, seed=0):
  """Numpy-drawn params: no init to compile."""
  abstract = nn.unbox(jax.eval_shape(generator.init_params, jax.random.key(0)))
  draw = np.random.default_rng(seed)
  return jax.tree.map(lambda a: draw.normal(0, 0.1, a.shape).astype(a.dtype),
                      abstract)


def _batch(stage, generator, sizes):
  """A held-out-like batch: the conditioning plus the data the moments need."""
  draw = np.random.default_rng(1)
  if stage == "prior":
    context, width = sizes.context_length, sizes.text_width
    return {"image_embedding": draw.normal(size=(ROWS, sizes.embed_dim)),
            "text_embedding": draw.normal(size=(ROWS, sizes.embed_dim)),
            "text_encodings": draw.normal(size=(ROWS, context, width)),
            "text_mask": np.ones((ROWS, context), bool)}
  side = generator.resolution
  image = draw.uniform(-1, 1, (ROWS, side, side, 3)).astype(np.float32)
  if stage == "decoder":
    return {"image": image, "tokens": np.zeros((ROWS, sizes.context_length),
                                               np.int32),
            "image_embedding": draw.normal(size=(ROWS, sizes.embed_dim))}
  low = side // generator.factor
  return {"image": image, "low_res": image[:, ::generator.factor,
                                           ::generator.factor][:, :low, :low]}


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def tiny(request):
  stage = request.param
  config = CONFIGS[stage].get_config("tiny")
  if stage == "decoder":
    config.model.learned_variance = True  # so that 'learned' is a choice
  sizes = ClipSizes.from_config(clip_config.get_config("tiny"))
  generator = generator_class(stage).from_config(config, sizes)
  params = _random_params(generator)
  batch = _batch(stage, generator, sizes)
  batch = {k: np.asarray(v, np.float32) if v.dtype == np.float64 else v
           for k, v in batch.items()}
  gamma = jax.jit(lambda p, b, r: generator.estimate_eps_moments(
      p, b, r, grid_size=8))(params, batch, jax.random.key(3))
  moments = EpsMoments(tuple(common.moments_grid(1000, 8).tolist()),
                       tuple(np.asarray(gamma).tolist()))
  return stage, generator, params, batch, moments


@pytest.mark.parametrize("sampler", diffusion.SAMPLERS)
def test_each_sampler_runs_through_each_generator(tiny, sampler):
  stage, generator, params, batch, moments = tiny
  assert len(moments.values) == 8 and np.isfinite(moments.values).all()
  assert min(moments.values) > 0
  out = generator.sample(params, batch, jax.random.key(0), num_steps=3,
                         sampler=sampler, eps_moments=moments)
  assert np.isfinite(np.asarray(out)).all()
  if sampler == "ddim":
    return
  if sampler == "analytic":
    # Gamma > 1 (a random model's) clips to the small variance; below 1 the
    # variance grows past it.
    half = EpsMoments(moments.timesteps, (0.5,) * len(moments.timesteps))
    out = generator.sample(params, batch, jax.random.key(0), num_steps=3,
                           sampler=sampler, eps_moments=half)
  # DDIM at eta=1 is DDPM with the small variance (docs/diffusion.md); other
  # variances differ at one seed, and from the deterministic eta=0.
  ddim = {eta: generator.sample(params, batch, jax.random.key(0), num_steps=3,
                                sampler="ddim", eta=eta) for eta in (0.0, 1.0)}
  # (The random prior's x0 barely depends on x_t: its samples differ by 1e-5.)
  assert not np.array_equal(out, ddim[0.0]), stage
  if sampler == "ddpm" and stage != "decoder":  # 'small': the default here
    np.testing.assert_allclose(out, ddim[1.0], atol=1e-5)
  else:
    assert not np.allclose(out, ddim[1.0], atol=1e-7), stage


def test_the_decoders_ddpm_default_is_its_learned_variance(tiny):
  stage, generator, params, batch, _ = tiny
  if stage != "decoder":
    pytest.skip("only the decoder learns its variance")
  kwargs = dict(num_steps=3, sampler="ddpm")
  default = generator.sample(params, batch, jax.random.key(0), **kwargs)
  learned = generator.sample(params, batch, jax.random.key(0),
                             variance="learned", **kwargs)
  np.testing.assert_array_equal(default, learned)


def test_analytic_without_moments_is_one_line(tiny):
  _, generator, params, batch, _ = tiny
  assert generator.eps_moments is None
  with pytest.raises(UserError, match="train the stage to config.total_steps, or "
                     "choose sampler 'ddim' or 'ddpm'") as raised:
    generator.sample(params, batch, jax.random.key(0), sampler="analytic")
  assert "\n" not in str(raised.value)


def test_moments_interpolate_in_t_and_survive_json(tmp_path):
  moments = EpsMoments((0, 500, 999), (1.0, 0.5, 0.0), step=4, num_examples=16)
  np.testing.assert_allclose(moments.at([0, 250, 999]), [1.0, 0.75, 0.0])
  moments.write(str(tmp_path))
  assert EpsMoments.read(str(tmp_path)) == moments
  assert EpsMoments.read(str(tmp_path / "nothing")) is None
  # The grid is the kept steps of a respacing: both ends, no extrapolation.
  grid = common.moments_grid(1000, 100)
  assert grid[0] == 0 and grid[-1] == 999 and len(grid) == 100


@pytest.mark.parametrize("stage, field, value, message", [
    ("prior", "sampler", "euler", "sample.sampler='euler': use one of"),
    ("decoder", "variance", "huge", "sample.variance='huge'"),
    ("decoder", "variance", "learned", "needs model.learned_variance=True"),
    ("upsampler", "threshold_percentile", 0.0, "must be in .0, 100"),
    ("prior", "moments_timesteps", 1, "sample.moments_timesteps=1 must be >= 2"),
])
def test_bad_sample_fields_are_one_line_config_errors(stage, field, value,
                                                      message):
  config = CONFIGS[stage].get_config("tiny")
  config.sample[field] = value
  with pytest.raises(ConfigError, match=message) as raised:
    common.validate_diffusion_config(config)
  assert "\n" not in str(raised.value)


def test_paper_presets_use_the_papers_samplers():
  prior = prior_config.get_config("paper").sample
  decoder = decoder_config.get_config("paper").sample
  assert (prior.sampler, prior.num_steps) == ("analytic", 64)
  assert (decoder.sampler, decoder.variance, decoder.num_steps) == (
      "ddpm", "learned", 250)
  for preset, steps in (("paper", 27), ("paper_1024", 15)):
    upsampler = upsampler_config.get_config(preset).sample
    assert (upsampler.sampler, upsampler.num_steps) == ("ddim", steps)
  for module in CONFIGS.values():
    assert module.get_config("demo").sample.sampler == "ddim"
    common.validate_diffusion_config(module.get_config("paper"))


def test_the_cli_offers_the_diffusion_samplers():
  assert sample_cli.SAMPLERS == diffusion.SAMPLERS
  assert sample_cli.VARIANCES == diffusion.DDPM_VARIANCES
