"""Every Python snippet and every `python -m unclip_jax...` / `launch/...` command
of README.md and docs/*.md runs (tests/doc_snippets.py: which are collected, and
how a doc marks one that cannot run here; those are listed as skipped with the
doc's reason). A failure names the doc's file and line.

What runs is the doc's text (commands and Python alike) made to take seconds on
the session's tiny chain (tests/chain.py) instead of the doc's minutes:
- a preset `configs/<stage>.py:<any>` becomes `configs/<stage>.py:tiny`;
- a stage's workdir, `W/<stage>`, `runs/<stage>`, `workdirs/demo/<stage>` or
  `/tmp/demo/<stage>`, is the tiny chain's, which has one upsampler: the demo's
  second (`.../upsampler2` in a list or an `--upsampler` flag) is left out; the
  `--workdir` a `train` or `bench` command writes is a new folder instead;
- the data_dir `/tmp/tfds` is the session's;
- `launch/local.sh [--fake-devices N] [--processes P] CONFIG WORKDIR ARGS` is
  the `python -m unclip_jax.train` it starts, on the session's 8 devices;
- `train` and `bench` commands also get the overrides tests/chain.py puts on
  the tiny preset (steps, eval sizes, the session's data_dir): they compile the
  chain's programs. A `train` command runs up to where it would compile its
  train step (flags, config checks, the workdir, the prior's and decoder's
  embedding caches, the mesh, the sharding checks): the training that follows
  is the chain's own, which tests/chain.py runs on these configs;
- `bench` gets `--steps=1 --repeats=1`.
A command that is an earlier one once substituted is skipped as that one.

Commands run in this process (the tool's module run as __main__, as `python -m`
runs it, with the global flags as that tool alone defines them; absl's one-time
process set-up is the test process's). Each doc's items run in document order
in one folder, its Python snippets in one namespace (a snippet may use what an
earlier one made; under -k, the earlier ones run first); the folder starts with
the input images the docs tell a reader to draw: scene.png, a.png, b.png (64
px) and small.png (16 px), bundled scenes. A command passes when it exits 0
(`--help`: 1, as absl's does).
"""
import contextlib
import dataclasses
import itertools
import logging
import os
import re
import runpy
import sys
import warnings
from unittest import mock

import pytest
from absl import app, flags
from absl import logging as absl_logging

from tests import chain, doc_snippets
from tests.doc_snippets import ROOT

SNIPPETS = doc_snippets.collect()
INPUTS = {"scene.png": ("carrot on a green background in the top right", 64),
          "a.png": ("chocolate bar on a pink background in the top right", 64),
          "b.png": ("fire on a purple background in the top left", 64),
          "small.png": ("fire on a blue background in the center", 16)}


@dataclasses.dataclass
class DocRun:
  """One doc's folder and namespace, and which of its items have run."""
  folder: str
  namespace: dict = dataclasses.field(default_factory=dict)
  done: set = dataclasses.field(default_factory=set)


class Docs:
  """The substitutions and every doc's run, for the module."""

  def __init__(self, tiny_chain: chain.ChainWorkdirs, root):
    self.stage_dirs = dict(clip=tiny_chain.clip, prior=tiny_chain.prior,
                           decoder=tiny_chain.decoder,
                           upsampler=tiny_chain.upsampler)
    self.tfds_dir, self.root, self.runs = tiny_chain.tfds_dir, root, {}
    self.workdirs = itertools.count()

  def run_of(self, doc: str) -> DocRun:
    if doc not in self.runs:
      from unclip_jax.data import scenes  # pylint: disable=import-outside-toplevel
      folder = self.root / doc.replace("/", "_")
      folder.mkdir()
      for name, (caption, side) in INPUTS.items():
        scenes.write_scene(caption, str(folder / name), side)
      self.runs[doc] = DocRun(str(folder))
    return self.runs[doc]

  def substitute(self, text: str) -> str:
    return doc_snippets.substitute(text, self.stage_dirs, self.tfds_dir)

  def command(self, text: str) -> tuple[str, list[str]]:
    """The tool's module and its arguments for a command of the docs."""
    tool, args = doc_snippets.tool_and_args(text)
    fresh = str(self.root / f"workdir_{next(self.workdirs)}")
    args = [self.substitute(a) for a in doc_snippets.with_workdir(tool, args, fresh)]
    if "--help" in args:
      return tool, args
    if tool in ("unclip_jax.train", "unclip_jax.bench") and any(
        a == "--config" or a.startswith("--config=") for a in args):
      args += _chain_overrides(args, self.tfds_dir)
    if tool == "unclip_jax.bench":
      args += ["--steps=1", "--repeats=1"]
    return tool, args


def _flat(config, prefix=""):
  for key, value in config.items():
    if hasattr(value, "items"):
      yield from _flat(value, f"{prefix}{key}.")
    else:
      yield f"{prefix}{key}", value


def _chain_overrides(args: list[str], tfds_dir: str) -> list[str]:
  """--config.a.b=v for what tests/chain.py sets on the stage's tiny preset."""
  stage = next(m.group(1) for m in map(re.compile(r"configs/(\w+)\.py:").search, args)
               if m)
  make = getattr(chain, f"{stage}_tiny")
  made = make(tfds_dir, "") if stage in ("prior", "decoder") else make(tfds_dir)
  tiny = dict(_flat(getattr(chain, f"{stage}_config").get_config("tiny")))
  return [f"--config.{key}={value}" for key, value in _flat(made)
          if key != "clip_workdir" and tiny.get(key) != value]


def _is_a_tools_flag(name: str) -> bool:
  if "." in name:  # --config.a.b, defined by its --config as it parses
    return True
  module = flags.FLAGS.find_module_defining_flag(name) or ""
  if module.endswith(".py"):  # a module run as __main__: absl names its file
    module = os.path.relpath(module, ROOT)[:-3].replace(os.sep, ".")
  return module.startswith("unclip_jax.") and module != "unclip_jax.cli"


@contextlib.contextmanager
def _as_its_own_process(argv: list[str]):
  """Global flags, sys.argv and loggers as `python -m tool` starts with them;
  afterwards as they were (other tests hold other tools' flags)."""
  app.define_help_flags()
  registry = flags.FLAGS._flags()  # pylint: disable=protected-access
  saved, was_parsed = dict(registry), flags.FLAGS.is_parsed()
  ours = logging.getLogger("unclip_jax")
  loggers = (list(ours.handlers), ours.level, ours.propagate)
  verbosity, saved_argv = absl_logging.get_verbosity(), sys.argv
  for name in [n for n in registry if _is_a_tools_flag(n)]:
    del registry[name]
  sys.argv = argv
  try:
    # Not absl's log handler on the root logger, faulthandler, process name.
    done = mock.patch.object(app._run_init, "done", True)  # pylint: disable=protected-access
    with done:
      yield
  finally:
    sys.argv = saved_argv
    flags.FLAGS.unparse_flags()
    # Kept: flags of libraries (or of cli.py) first imported by this run.
    added = {n: f for n, f in registry.items()
             if n not in saved and not _is_a_tools_flag(n)}
    registry.clear()
    registry.update(saved, **added)
    if was_parsed:
      flags.FLAGS.mark_as_parsed()
    ours.handlers, ours.level, ours.propagate = loggers
    absl_logging.set_verbosity(verbosity)


@contextlib.contextmanager
def _in(folder: str):
  cwd = os.getcwd()
  os.chdir(folder)
  try:
    yield
  finally:
    os.chdir(cwd)


class _WouldCompile(Exception):
  """Where a train command would compile its step."""


def _stop(*args, **kwargs):
  raise _WouldCompile


def run_command(tool: str, args: list[str]) -> int:
  """The exit status of `python -m tool args`, run in this process (a train
  command: up to its step's compile)."""
  stop = (mock.patch("unclip_jax.train.step.compile_train_step", _stop)
          if tool == "unclip_jax.train" else contextlib.nullcontext())
  try:
    with _as_its_own_process([tool, *args]), warnings.catch_warnings(), stop:
      # python -m finds the tool not yet imported; here it may be.
      warnings.filterwarnings("ignore", "'unclip_jax", RuntimeWarning)
      runpy.run_module(tool, run_name="__main__", alter_sys=True)
    return 0
  except SystemExit as e:
    return e.code or 0
  except _WouldCompile:
    return 0


def run_snippet(snippet: doc_snippets.Snippet, docs: Docs) -> None:
  run = docs.run_of(snippet.doc)
  run.done.add(snippet.id)
  with _in(run.folder):
    if snippet.kind == "python":
      # Blank lines first: a traceback gives the doc's own line numbers.
      code = "\n" * (snippet.line - 1) + docs.substitute(snippet.text)
      code = compile(code, str(ROOT / snippet.doc), "exec")
      exec(code, run.namespace)  # pylint: disable=exec-used
      return
    tool, args = docs.command(snippet.text)
    status = run_command(tool, args)
  assert status in ((0, 1) if "--help" in args else (0,)), (
      f"{snippet.id}: `{snippet.text}` exited {status}, run as "
      f"`python -m {tool} {' '.join(args)}` (its output is above)")


@pytest.fixture(scope="module")
def docs(tiny_chain, tmp_path_factory):
  return Docs(tiny_chain, tmp_path_factory.mktemp("docs"))


@pytest.mark.parametrize("snippet", [
    pytest.param(s, id=s.id, marks=[pytest.mark.skip(reason=s.skip)] if s.skip else [])
    for s in SNIPPETS])
def test_doc_runs(snippet, docs):
  # What comes before it in its doc (names defined, files written) runs first,
  # when a -k selection left it out.
  for earlier in SNIPPETS[:SNIPPETS.index(snippet)]:
    if (earlier.doc == snippet.doc and not earlier.skip
        and earlier.id not in docs.run_of(earlier.doc).done):
      with contextlib.suppress(Exception):  # its own test reports it
        run_snippet(earlier, docs)
  run_snippet(snippet, docs)


def test_every_marker_marks_something():
  assert not doc_snippets.stray_markers()
