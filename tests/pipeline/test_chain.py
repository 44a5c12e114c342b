"""Text-to-image through the tiny chain: shapes, prompt-major order,
intermediates, determinism, chunking, and prompts that need a warning."""
import logging

import jax
import numpy as np
import pytest

from unclip_jax.errors import UserError
from unclip_jax.parallel.local import put_local_rows
from unclip_jax.pipeline import options

PROMPT = "red apple on a blue background in the top left"


@pytest.fixture(scope="module")
def samples(pipe):
  return pipe.generate([PROMPT, "a dog on a green background in the center"],
                       num_images=3, seed=0)


def test_generate_shapes_and_intermediates(pipe, samples):
  assert pipe.base_resolution == 8 and pipe.resolution == 16
  assert samples.images.shape == (6, 16, 16, 3) and samples.images.dtype == np.uint8
  assert [x.shape for x in samples.cascade] == [(6, 8, 8, 3), (6, 16, 16, 3)]
  assert samples.base_images is samples.cascade[0]
  assert samples.noise.shape == (6, 8, 8, 3)
  embed_dim = pipe.clip.embed_dim
  assert samples.image_embeddings.shape == samples.text_embeddings.shape == (
      6, embed_dim)
  np.testing.assert_allclose(np.linalg.norm(samples.image_embeddings, axis=1), 1,
                             atol=1e-5)
  # Prompt-major: rows 0-2 are the first prompt's, 3-5 the second's.
  assert samples.prompts[:3] == (PROMPT,) * 3 and samples.prompts[3] != PROMPT
  np.testing.assert_array_equal(samples.text_embeddings[0], samples.text_embeddings[2])
  assert not np.allclose(samples.text_embeddings[2], samples.text_embeddings[3])
  np.testing.assert_array_equal(samples.tokens[0], pipe.clip.tokenize([PROMPT])[0])


def test_same_seed_same_images(pipe, samples):
  again = pipe([PROMPT, "a dog on a green background in the center"],
               num_images=3, seed=0)
  np.testing.assert_array_equal(again, samples.images)
  other = pipe.generate([PROMPT, "a dog on a green background in the center"],
                        num_images=3, seed=1)
  assert not np.array_equal(other.images, samples.images)
  assert not np.array_equal(other.noise, samples.noise)


def test_requests_larger_than_a_chunk(pipe, samples):
  # 10 rows in chunks of 8 (max_batch): the same compiled samplers, padding
  # dropped, row i's x_T the same as in a smaller request of the same seed.
  more = pipe.generate([PROMPT, "a dog on a green background in the center"],
                       num_images=5, seed=0)
  assert more.images.shape == (10, 16, 16, 3)
  np.testing.assert_array_equal(more.noise[:3], samples.noise[:3])
  assert len({row.tobytes() for row in more.images}) == 10


def test_odd_prompts_sample_with_one_line_warnings(pipe, caplog, monkeypatch):
  # The CLIs stop our logger's propagation (cli.py); caplog listens at the root.
  monkeypatch.setattr(logging.getLogger("unclip_jax"), "propagate", True)
  long = "red apple " * 30 + "🍎 naïve"
  with caplog.at_level(logging.WARNING, logger="unclip_jax"):
    out = pipe.generate([long, ""], num_images=2, seed=0)
  assert out.images.shape == (4, 16, 16, 3)
  messages = [r.getMessage() for r in caplog.records]
  assert any("is empty: sampling unconditionally" in m for m in messages)
  assert any("so it is truncated: CLIP the first 24" in m for m in messages)
  assert any("never saw" in m and "🍎" in m for m in messages)
  assert all("\n" not in m for m in messages)
  # The empty prompt's caption is the dropped (all-pad) one for the decoder.
  assert out.prompts[2:] == ("", "")


@pytest.mark.parametrize("kwargs, message", [
    (dict(num_images=0), "num_images must be a whole number >= 1"),
    (dict(num_images=-2), "num_images must be"),
    (dict(prior_steps=0), "prior_steps=0"),
    (dict(decoder_steps=10_000), "decoder_steps=10000"),
    (dict(prior_candidates=0), "prior_candidates"),
    (dict(upsampler_steps=[2, 2]), "2 values for 1 upsamplers"),
    (dict(seed="x"), "seed must be a whole number"),
])
def test_bad_options_are_one_line_errors(pipe, kwargs, message):
  with pytest.raises(UserError, match=message) as raised:
    pipe.generate([PROMPT], **{"num_images": 1, **kwargs})
  assert "\n" not in str(raised.value)


@pytest.mark.parametrize("prompts, message", [
    ([], "no prompts given"), ([PROMPT, 3], "prompts must be strings")])
def test_bad_prompts_are_one_line_errors(pipe, prompts, message):
  with pytest.raises(UserError, match=message):
    pipe(prompts)


def test_one_string_is_one_prompt(pipe):
  np.testing.assert_array_equal(pipe.encode_text(PROMPT), pipe.encode_text([PROMPT]))


def test_empty_prompts_take_the_priors_unconditional_branch(pipe):
  """Rows with drop_text ignore their caption's token encodings entirely."""
  prior = pipe.stages.prior
  tokens = pipe.clip.tokenize([PROMPT] * 8)
  z_t, encodings = (np.asarray(x) for x in pipe.clip.encode_text(tokens))
  other = np.asarray(pipe.clip.encode_text(pipe.clip.tokenize(["a cat"] * 8))[1])
  mask = pipe.clip.text_mask(tokens)

  def sample(encodings, drop):
    conditioning = {"text_embedding": z_t, "text_encodings": encodings,
                    "text_mask": mask, "drop_text": np.full(8, drop)}
    return np.asarray(prior.generator.sample(
        prior.params, {k: put_local_rows(v) for k, v in conditioning.items()},
        jax.random.key(0), **options.prior_options(prior.config)))
  np.testing.assert_allclose(sample(encodings, True), sample(other, True), atol=1e-6)
  assert not np.allclose(sample(encodings, False), sample(other, False), atol=1e-4)


def test_the_chain_benchmark_reports_prompts_per_second(tiny_chain):
  from unclip_jax.bench import sampling  # pylint: disable=import-outside-toplevel
  result = sampling.bench_chain(**tiny_chain.as_kwargs(), num_prompts=1, repeats=1)
  assert result["prompts_per_sec"] > 0 and result["resolution"] == 16
