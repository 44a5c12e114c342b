"""Per-stage samplers through the pipeline and the CLI on the tiny chain: the
options reach the generators, analytic runs on the moments training wrote,
variations decode the image's own inverted x_T."""
import dataclasses
import os

import numpy as np
import pytest
from absl import flags

from unclip_jax.errors import UserError
from unclip_jax.generators.base import EPS_MOMENTS_FILENAME
from unclip_jax.pipeline import UnCLIPPipeline
from unclip_jax.sample import __main__ as sample_cli

PROMPT = "red apple on a blue background in the top left"
STEPS = dict(decoder_steps=10)  # as test_manipulations: its programs are reused


@pytest.fixture(scope="module")
def default(pipe):
  return pipe.generate([PROMPT], num_images=2, seed=0)


def test_training_wrote_moments_that_every_stage_loaded(tiny_chain, pipe):
  for workdir in (tiny_chain.prior, tiny_chain.decoder, tiny_chain.upsampler):
    assert os.path.exists(os.path.join(workdir, EPS_MOMENTS_FILENAME))
  for trained in (pipe.stages.prior, pipe.stages.decoder, *pipe.stages.upsamplers):
    moments = trained.eps_moments
    assert moments is trained.generator.eps_moments is not None
    assert len(moments.values) == trained.config.sample.moments_timesteps
    assert moments.step == trained.config.total_steps
    assert np.all(np.isfinite(moments.values)) and min(moments.values) > 0


def test_decoder_sampler_reaches_the_decoder(pipe, default):
  ddpm = pipe.generate([PROMPT], num_images=2, seed=0, decoder_sampler="ddpm",
                       decoder_variance="large")
  # The same prior, x_T and seed: only the decoder's sampler differs.
  np.testing.assert_array_equal(ddpm.image_embeddings, default.image_embeddings)
  np.testing.assert_array_equal(ddpm.noise, default.noise)
  assert not np.array_equal(ddpm.base_images, default.base_images)


def test_analytic_runs_on_the_chains_moments(pipe, default):
  out = pipe.generate([PROMPT], num_images=2, seed=0, prior_sampler="analytic",
                      upsampler_sampler="analytic")
  assert out.images.shape == default.images.shape
  assert not np.allclose(out.image_embeddings, default.image_embeddings,
                         atol=1e-6)


def test_analytic_without_moments_is_one_line(pipe):
  stages = pipe.stages
  bare = UnCLIPPipeline(dataclasses.replace(
      stages, prior=dataclasses.replace(stages.prior, eps_moments=None)),
                        max_batch=8)
  with pytest.raises(UserError, match="prior_sampler='analytic' needs the eps "
                     "moments.*or choose prior_sampler 'ddim' or 'ddpm'") as raised:
    bare.generate([PROMPT], num_images=1, prior_sampler="analytic")
  assert "\n" not in str(raised.value)


def test_inverted_variations_at_eta_0_are_the_reconstruction(pipe,
                                                             training_records):
  image = training_records[0]["image"]
  out = pipe.variations(image, num_images=2, eta=0.0, seed=0, **STEPS)
  z_i = pipe.encode_images(image)
  reconstruction = pipe.decode(z_i, noise=pipe.invert(image, **STEPS),
                               decoder_eta=0.0, seed=0, **STEPS)
  for row in out.base_images:  # to a level of rounding
    np.testing.assert_allclose(row, reconstruction.base_images[0], atol=1)
  # eta > 0: each row, and each seed, its own variation of that x_T.
  varied = pipe.variations(image, num_images=2, eta=1.0, seed=0, **STEPS)
  np.testing.assert_array_equal(varied.noise, out.noise)
  assert not np.array_equal(varied.base_images[0], varied.base_images[1])
  other = pipe.variations(image, num_images=2, eta=1.0, seed=1, **STEPS)
  assert not np.array_equal(other.base_images, varied.base_images)
  random = pipe.variations(image, num_images=2, eta=0.0, seed=0,
                           latents="random", **STEPS)
  np.testing.assert_array_equal(random.noise, pipe.noise(0, 2))


@pytest.mark.parametrize("call, message", [
    (lambda p, x: p.generate([PROMPT], decoder_sampler="euler"),
     "decoder_sampler='euler': use one of"),
    (lambda p, x: p.generate([PROMPT], decoder_variance="learned"),
     "decoder_variance='learned': this decoder takes one of"),
    (lambda p, x: p.generate([PROMPT], decoder_threshold=0),
     "decoder_threshold=0: a percentile in"),
    (lambda p, x: p.generate([PROMPT], prior_eta=-1), "prior_eta=-1 must be"),
    (lambda p, x: p.generate([PROMPT], upsampler_sampler=["ddim", "ddpm"]),
     "upsampler_sampler has 2 values for 1 upsamplers"),
    (lambda p, x: p.generate([PROMPT], decoder_stpes=3),
     "generate has no option 'decoder_stpes'"),
    (lambda p, x: p.decode(np.zeros((1, 32)), prior_steps=3),
     "decode has no option 'prior_steps'"),
    (lambda p, x: p.variations(x, decoder_sampler="ddpm"),
     "variations decodes with DDIM at its own eta, so it takes no "
     "decoder_sampler"),
    (lambda p, x: p.interpolate(x, x, decoder_eta=0.5), "takes no decoder_eta"),
    (lambda p, x: p.variations(x, latents="fixed"), "latents='fixed'"),
])
def test_bad_sampler_options_are_one_line_errors(pipe, training_records, call,
                                                 message):
  with pytest.raises(UserError, match=message) as raised:
    call(pipe, training_records[0]["image"])
  assert "\n" not in str(raised.value)


def _flags(args):
  flags.FLAGS.unparse_flags()
  return flags.FLAGS(["unclip_jax.sample", *args])


class _Recorder:
  """Stands in for the pipeline: records what the CLI asks of it."""

  def __init__(self):
    self.calls = []

  def __getattr__(self, method):
    def record(*args, **kwargs):
      self.calls.append((method, args, kwargs))
      raise StopIteration  # nothing to draw: the call is what is tested
    return record


@pytest.mark.parametrize("args, method, expected", [
    (["--prompt=a", "--prior=p", "--prior_sampler=analytic", "--decoder_sampler=ddpm",
      "--decoder_variance=large", "--decoder_threshold=99.5",
      "--upsampler_sampler=ddim", "--upsampler_eta=0.5", "--prior_eta=0.2"],
     "generate", dict(prior_sampler="analytic", decoder_sampler="ddpm",
                      decoder_variance="large", decoder_threshold=99.5,
                      upsampler_sampler="ddim", upsampler_eta=0.5,
                      prior_eta=0.2)),
    (["variations", "--image=x.png"], "variations", dict(latents="inverted")),
    (["variations", "--image=x.png", "--latents=random",
      "--upsampler_steps=3", "--upsampler_steps=4"], "variations",
     dict(latents="random", upsampler_steps=[3, 4])),
    (["interpolate", "--image=a.png", "--image=b.png"], "interpolate",
     dict(latents="fixed")),
])
def test_cli_flags_reach_the_pipeline(args, method, expected):
  argv = _flags(args)
  command = sample_cli._command(argv)  # pylint: disable=protected-access
  sample_cli._check_inputs(command)  # pylint: disable=protected-access
  recorder = _Recorder()
  with pytest.raises(StopIteration):
    sample_cli._run(recorder, command)  # pylint: disable=protected-access
  (called, _, kwargs), = recorder.calls
  assert called == method
  assert {k: kwargs[k] for k in expected} == expected


def test_cli_refuses_latents_a_command_does_not_take():
  _flags(["text_diff", "--image=x.png", "--latents=random"])
  with pytest.raises(UserError, match="--latents=random does not apply to "
                     "text_diff"):
    sample_cli._check_inputs("text_diff")  # pylint: disable=protected-access
