"""from_workdirs: one-line errors for workdirs that are missing, empty, of the
wrong stage, or from stages that do not fit together (naming the pair)."""
import json
import os
import shutil

import pytest

from unclip_jax import UnCLIPPipeline
from unclip_jax.errors import UserError, WorkdirError
from unclip_jax.pipeline import IncompatibleStagesError


def _copy(workdir, tmp_path, name):
  """A copy of a workdir without its embedding cache."""
  copy = str(tmp_path / name)
  shutil.copytree(workdir, copy, ignore=shutil.ignore_patterns("cache", "samples"))
  return copy


def _edit_json(path, edit):
  with open(path) as f:
    data = json.load(f)
  edit(data)
  with open(path, "w") as f:
    json.dump(data, f)


def _load_error(error, message, **kwargs):
  with pytest.raises(error, match=message) as raised:
    UnCLIPPipeline.from_workdirs(**kwargs)
  assert "\n" not in str(raised.value)
  return str(raised.value)


def test_loads_every_stage_at_its_latest_step(pipe, tiny_chain):
  stages = pipe.stages
  assert stages.clip.step == 2 and stages.prior.step == 4
  assert stages.decoder.step == 4 and stages.upsamplers[0].step == 4
  assert stages.workdirs["upsampler"] == tiny_chain.upsampler


def test_wrong_stage_missing_and_empty_workdirs(tiny_chain, tmp_path):
  chain = tiny_chain.as_kwargs()
  _load_error(WorkdirError, "holds a 'prior' run, not a 'decoder' run",
              **{**chain, "decoder": tiny_chain.prior})
  _load_error(WorkdirError, "holds a 'decoder' run, not a 'clip' run",
              **{**chain, "clip": tiny_chain.decoder})
  _load_error(WorkdirError, "not a upsampler workdir \\(no config.json\\)",
              **{**chain, "upsamplers": [str(tmp_path / "missing")]})
  empty = str(tmp_path / "untrained")
  os.makedirs(empty)
  shutil.copy(os.path.join(tiny_chain.prior, "config.json"), empty)
  _load_error(WorkdirError, "has no checkpoint", **{**chain, "prior": empty})
  _load_error(WorkdirError, "no checkpoint at step 3",
              **chain, step={"decoder": 3})
  _load_error(UserError, "no decoder workdir", clip=tiny_chain.clip)


def test_a_prior_trained_on_another_clip_is_named(tiny_chain, tmp_path):
  prior = _copy(tiny_chain.prior, tmp_path, "prior")
  _edit_json(os.path.join(prior, "frozen_clip.json"), lambda d: d.update(
      fingerprint="/elsewhere/clip@2:123:abc", workdir="/elsewhere/clip"))
  message = _load_error(IncompatibleStagesError, "the CLIP .* and the prior",
                        **{**tiny_chain.as_kwargs(), "prior": prior})
  assert "/elsewhere/clip" in message


def test_a_moved_workdir_still_fits(tiny_chain, tmp_path):
  # The fingerprint names the CLIP's path; a copied CLIP is the same checkpoint.
  clip = _copy(tiny_chain.clip, tmp_path, "clip")
  pipe = UnCLIPPipeline.from_workdirs(clip=clip, decoder=tiny_chain.decoder)
  assert pipe.stages.prior is None
  with pytest.raises(UserError, match="has no prior"):
    pipe(["a prompt"])


def test_embedding_width_mismatch_is_named(tiny_chain, tmp_path):
  decoder = _copy(tiny_chain.decoder, tmp_path, "decoder")
  _edit_json(os.path.join(decoder, "frozen_clip.json"),
             lambda d: d.update(embed_dim=64))
  _load_error(IncompatibleStagesError, "the decoder was trained on a CLIP with "
              "embed_dim=64, this CLIP has 32",
              **{**tiny_chain.as_kwargs(), "decoder": decoder})


def test_resolution_chain_mismatch_is_named(tiny_chain, tmp_path):
  upsampler = _copy(tiny_chain.upsampler, tmp_path, "upsampler")
  _edit_json(os.path.join(upsampler, "config.json"),
             lambda d: d["model"].update(low_res=4))
  _load_error(IncompatibleStagesError, "the decoder .* and the upsampler .*: the "
              "decoder makes 8 px images, the upsampler takes 4 px ones",
              **{**tiny_chain.as_kwargs(), "upsamplers": [upsampler]})
  # Two 8 -> 16 upsamplers: the second cannot take the first's 16 px.
  _load_error(IncompatibleStagesError, "upsampler 1 .* and the upsampler 2",
              **{**tiny_chain.as_kwargs(),
                 "upsamplers": [tiny_chain.upsampler] * 2})
