"""End to end: a converted Karlo samples through our UnCLIPPipeline exactly as
diffusers' UnCLIPPipeline samples the original, given the same noises.

The model is tiny and random (tests/convert/tiny_karlo.py); diffusers draws each
step's noise from `randn_tensor`, which the test replaces by a list of arrays
that our pipeline is given too (`generate(noises=...)`).

Where two float32 implementations must differ: every stage starts at t = 999,
where x0 = (x - sqrt(1 - a) eps) / sqrt(a) with sqrt(a) = 5e-5, clipped to
[-1, 1]. A value whose x - eps falls within 5e-5 of zero is not clipped, and
carries the model's float32 rounding (1e-6 relative) times 2e4. About one value
in 10^4 does (measured: 1 of 6144 here, 0.013 off; the rest agree to 3e-5).
"""
import os
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from tests.convert.tiny_karlo import build_karlo  # noqa: E402
from unclip_jax.errors import ConversionError  # noqa: E402

PROMPTS = ["a red apple", "the blue sea, a cat!"]
PRIOR_STEPS, DECODER_STEPS, SUPER_RES_STEPS = 4, 3, 2


@pytest.fixture(scope="module")
def karlo(tmp_path_factory):
  root = tmp_path_factory.mktemp("karlo")
  source = str(root / "karlo")
  pipe = build_karlo(source)
  out = str(root / "converted")
  result = subprocess.run(
      [sys.executable, "-m", "unclip_jax.convert", "karlo", "--src", source,
       "--out", out], capture_output=True, text=True, check=False,
      env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert result.returncode == 0, result.stderr[-2000:]
  return pipe, source, out, result.stdout


def _noises(pipe, rows: int, seed: int = 0) -> dict:
  rng = np.random.default_rng(seed)
  decoder_side = pipe.decoder.config.sample_size
  super_side = pipe.super_res_first.config.sample_size
  dim = pipe.prior.config.embedding_dim

  def stage(steps, *shape):
    return {"x_T": rng.standard_normal((rows, *shape)).astype(np.float32),
            "steps": rng.standard_normal((steps, rows, *shape)).astype(np.float32)}
  return {"prior": stage(PRIOR_STEPS, dim),
          "decoder": stage(DECODER_STEPS, decoder_side, decoder_side, 3),
          "upsamplers": [stage(SUPER_RES_STEPS, super_side, super_side, 3)]}


def _theirs(pipe, noises, monkeypatch) -> np.ndarray:
  """diffusers' images float [N, H, W, 3] in [0, 1], its step draws replaced by
  ours (in the order its loops draw them: prior, decoder, super-res; none at
  the last step of each)."""
  from diffusers.schedulers import scheduling_unclip
  nchw = lambda x: torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))
  draws = ([torch.from_numpy(x) for x in noises["prior"]["steps"][:-1]]
           + [nchw(x) for x in noises["decoder"]["steps"][:-1]]
           + [nchw(x) for x in noises["upsamplers"][0]["steps"][:-1]])
  draws = iter(draws)
  monkeypatch.setattr(scheduling_unclip, "randn_tensor",
                      lambda shape, **kw: next(draws))
  images = pipe(
      PROMPTS, prior_num_inference_steps=PRIOR_STEPS,
      decoder_num_inference_steps=DECODER_STEPS,
      super_res_num_inference_steps=SUPER_RES_STEPS,
      prior_latents=torch.from_numpy(noises["prior"]["x_T"]),
      decoder_latents=nchw(noises["decoder"]["x_T"]),
      super_res_latents=nchw(noises["upsamplers"][0]["x_T"]),
      output_type="np").images
  assert next(draws, None) is None  # every draw was used
  return images


def test_converted_karlo_samples_as_diffusers(karlo, monkeypatch):
  from unclip_jax.pipeline import UnCLIPPipeline
  pipe, _, out, stdout = karlo
  for stage in ("clip", "prior", "decoder", "upsampler"):
    assert os.path.join(out, stage) in stdout
  noises = _noises(pipe, len(PROMPTS))
  theirs = _theirs(pipe, noises, monkeypatch)

  ours = UnCLIPPipeline.from_workdirs(
      clip=os.path.join(out, "clip"), prior=os.path.join(out, "prior"),
      decoder=os.path.join(out, "decoder"),
      upsamplers=[os.path.join(out, "upsampler")])
  samples = ours.generate(
      PROMPTS, num_images=1, noises=noises, prior_steps=PRIOR_STEPS,
      decoder_steps=DECODER_STEPS, upsampler_steps=SUPER_RES_STEPS)
  ours_01 = np.clip(samples.final * 0.5 + 0.5, 0, 1)
  assert ours_01.shape == theirs.shape
  assert theirs.std() > 0.05  # not a constant image
  difference = np.abs(ours_01 - theirs)
  assert np.mean(difference <= 1e-3) >= 0.999, np.sort(difference.ravel())[-10:]
  assert difference.max() <= 0.05


def test_conversion_refuses_a_changed_checkpoint(karlo, tmp_path):
  """A tensor missing from one component: one error naming it, nothing left
  half-written under --out."""
  from safetensors.numpy import load_file, save_file
  from unclip_jax.convert import karlo as karlo_convert
  _, source, _, _ = karlo
  broken = tmp_path / "broken"
  subprocess.run(["cp", "-r", source, str(broken)], check=True)
  path = broken / "decoder" / "diffusion_pytorch_model.safetensors"
  tensors = load_file(str(path))
  del tensors["conv_out.bias"]
  save_file(tensors, str(path))
  with pytest.raises(ConversionError, match="conv_out.bias"):
    karlo_convert.convert(str(broken), str(tmp_path / "out"))
  assert not os.path.exists(tmp_path / "out")
  assert not os.path.exists(tmp_path / "out.partial")
