"""The parts of tests/test_bad_inputs.py's table: what a case may use (`Env`),
and the functions that run one kind of case (a config check, a flag parse, an
entry point's main, a workdir made for it)."""
import dataclasses
import json
import os
import pathlib
import shutil
from typing import Callable

import jax
import ml_collections
import numpy as np
import pytest
from absl import flags
from ml_collections import config_flags
from PIL import Image

from configs import clip as clip_config
from configs import decoder as decoder_config
from configs import prior as prior_config
from configs import upsampler as upsampler_config
from unclip_jax import cli, stages
from unclip_jax import compile as compile_cli
from unclip_jax.pipeline import UnCLIPPipeline
from unclip_jax.sample import __main__ as sample_cli
from unclip_jax.train import config_checks, loop

CONFIGS = {"clip": clip_config, "prior": prior_config, "decoder": decoder_config,
           "upsampler": upsampler_config}


@dataclasses.dataclass
class Env:
  """What a case may use: a fresh folder, the module's image files, and the
  session's tiny trained chain (trained only when a case asks for it)."""
  tmp: str
  images: str
  request: pytest.FixtureRequest

  @property
  def chain(self):
    return self.request.getfixturevalue("tiny_chain")

  @property
  def pipe(self) -> UnCLIPPipeline:
    return self.request.getfixturevalue("pipe")

  def format(self, value):
    return value.format(tmp=self.tmp, images=self.images) if isinstance(
        value, str) else value


@dataclasses.dataclass(frozen=True)
class Case:
  name: str  # as in docs/reliability.md
  run: Callable[[Env], object]
  error: type
  message: str  # a part of the one line


def tiny(stage: str, overrides: dict | None = None,
         env: Env | None = None) -> ml_collections.ConfigDict:
  """The stage's tiny preset with {"a.b": value} overrides."""
  config = CONFIGS[stage].get_config("tiny")
  for dotted, value in (overrides or {}).items():
    parent, _, leaf = dotted.rpartition(".")
    (config[parent] if parent else config)[leaf] = (
        env.format(value) if env else value)
  return config


def common(overrides):
  return lambda env: config_checks.check_common(tiny("clip", overrides),
                                                reads_data=False)


def dataset(name):
  return lambda env: config_checks.check_dataset(
      ml_collections.ConfigDict({"name": name, "data_dir": env.tmp}))


def validate(stage, overrides):
  return lambda env: stages.get_stage(stage)(
      tiny(stage, overrides, env), env.tmp).validate()


def train_flags(*args):
  """`python -m unclip_jax.train ARGS`'s flag parsing (its flags, defined
  afresh: the global ones are sample's and compile's here)."""
  def run(env):
    argv = ["unclip_jax.train", *(env.format(a) for a in args)]
    flag_values = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "", flag_values=flag_values,
                                    lock_config=True, sys_argv=argv)
    flags.DEFINE_string("workdir", None, "", flag_values=flag_values)
    flags.mark_flags_as_required(["config", "workdir"], flag_values=flag_values)
    cli.parse_flags(argv, flag_values)
  return run


def main_of(module, name):
  """module.main after cli's flag parsing of ARGS on the global flags."""
  def with_args(*args):
    def run(env):
      flags.FLAGS.unparse_flags()
      module.main(cli.parse_flags([name, *(env.format(a) for a in args)]))
    return run
  return with_args


sample = main_of(sample_cli, "unclip_jax.sample")
compile_ = main_of(compile_cli, "unclip_jax.compile")
SAMPLE_WORKDIRS = ("--clip={tmp}/clip", "--decoder={tmp}/decoder",
                   "--out={tmp}/out.png")


def variations(*args):
  return sample("variations", *SAMPLE_WORKDIRS, *args)


def write_config(workdir: str, config) -> str:
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, "config.json"), "w") as f:
    f.write(config if isinstance(config, str) else config.to_json())
  return workdir


def train_on_previous(previous, overrides=None):
  """loop.train of a tiny CLIP with `overrides` in a workdir whose config.json
  is `previous` (a config, or text)."""
  def run(env):
    workdir = write_config(os.path.join(env.tmp, "run"), previous)
    config = tiny("clip", {"data.data_dir": "{tmp}/tfds", **(overrides or {})}, env)
    loop.train(config, workdir)
  return run


def _refuse_to_write(**_):
  raise PermissionError(13, "Permission denied")


def unwritable_workdir(env):
  parent = os.path.join(env.tmp, "read_only")
  os.makedirs(parent)
  os.chmod(parent, 0o555)
  if os.geteuid() == 0:  # root writes there anyway: the write is refused instead
    env.request.getfixturevalue("monkeypatch").setattr(
        config_checks.tempfile, "TemporaryFile", _refuse_to_write)
  config_checks.prepare_workdir(tiny("clip"), os.path.join(parent, "run"))


def full_disk(env):
  state = {"params": jax.ShapeDtypeStruct((1024, 1024), np.float32)}  # 4 MiB
  config_checks.check_disk_space(env.tmp, state, free_bytes=2**20)


def fake_prior_run(env) -> str:
  """A folder with only a prior's config.json."""
  return write_config(os.path.join(env.tmp, "prior"), tiny("prior"))


def mismatched_prior(env):
  """The chain's prior, recorded as trained on a CLIP of another width."""
  prior = shutil.copytree(env.chain.prior, os.path.join(env.tmp, "prior"))
  path = os.path.join(prior, "frozen_clip.json")
  with open(path) as f:
    frozen = json.load(f)
  frozen["embed_dim"] += 32
  with open(path, "w") as f:
    json.dump(frozen, f)
  UnCLIPPipeline.from_workdirs(**{**env.chain.as_kwargs(), "prior": prior})


def write_image_files(folder: pathlib.Path) -> str:
  """The images the cases read, into `folder`: broken ones and ones in other
  modes."""
  Image.new("RGB", (1, 1), (1, 2, 3)).save(folder / "one_pixel.png")
  Image.new("F", (16, 16), 0.5).save(folder / "float.tiff")
  Image.new("I", (16, 16), 70_000).save(folder / "int32.tiff")
  (folder / "not_an_image.png").write_text("hello")
  (folder / "empty.png").write_bytes(b"")
  Image.new("RGBA", (16, 16), (255, 0, 0, 0)).save(folder / "rgba.png")
  Image.new("LA", (16, 16), (100, 255)).save(folder / "la.png")
  Image.new("L", (16, 16), 100).save(folder / "l.png")
  Image.new("P", (16, 16), 0).save(folder / "p.png")  # palette entry 0: black
  Image.new("1", (16, 16), 1).save(folder / "one_bit.png")
  Image.new("CMYK", (16, 16), (0, 0, 0, 0)).save(folder / "cmyk.jpg")
  Image.fromarray(np.full((16, 16), 257 * 100, np.uint16)).save(
      folder / "sixteen_bit.png")
  return str(folder)
