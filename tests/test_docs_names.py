"""What README.md and docs/*.md name exists: every `--config.<field>` override is
a field of some stage's config, every `configs/<stage>.py:<preset>` a preset of
it, every repository path is a file, and every flag of a `python -m
unclip_jax.<tool>` command is one that tool defines. Read from the text (fast);
tests/test_docs_run.py runs the commands, with tiny presets."""
import functools
import pathlib
import re

import pytest

from configs import clip, decoder, prior, upsampler

ROOT = pathlib.Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
# Deliberate mistakes, shown in docs/reliability.md's bad-input tables.
MISTAKES = {"x.y", "a.b", "optim.lrr", "optim.lr.x", "configs/nope.py",
            "configs/clip.py:huge", "configs/decoder.py:huge"}
STAGES = {"clip": clip, "prior": prior, "decoder": decoder, "upsampler": upsampler}
PATH = re.compile(r"\b((?:unclip_jax|configs|tests|launch|docs)/[\w/.-]+\.(?:py|sh|md|sbatch|png))")
COMMAND = re.compile(r"python -m (unclip_jax\.\w+)((?:[^\n`|]|\\\n)*)")
FLAG = re.compile(r"(?<![\w-])--([a-z][a-z_]*)(?==|\s|$|\))")


def _text(path: pathlib.Path) -> str:
  return path.read_text(encoding="utf-8")


@functools.cache
def _config_fields() -> set[str]:
  """Every dotted field of every preset of every stage's config."""
  fields = set()
  for module in STAGES.values():
    for preset in module.PRESETS:
      stack = [("", module.get_config(preset))]
      while stack:
        prefix, node = stack.pop()
        for key in node.keys():
          name = prefix + key
          fields.add(name)
          if hasattr(node[key], "keys"):
            stack.append((name + ".", node[key]))
  return fields


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_config_overrides_name_real_fields(doc):
  named = set(re.findall(r"--config\.([a-z_][a-z0-9_.]*[a-z0-9_])", _text(doc)))
  unknown = sorted(named - _config_fields() - MISTAKES)
  assert not unknown, f"{doc.name} names config fields no config has: {unknown}"


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_presets_exist(doc):
  named = re.findall(r"configs/(clip|prior|decoder|upsampler)\.py:(\w+)", _text(doc))
  unknown = sorted({f"configs/{stage}.py:{preset}" for stage, preset in named
                    if preset not in STAGES[stage].PRESETS} - MISTAKES)
  assert not unknown, f"{doc.name} names presets no config has: {unknown}"


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_paths_exist(doc):
  missing = sorted({p for p in PATH.findall(_text(doc))
                    if p not in MISTAKES and not (ROOT / p).exists()})
  assert not missing, f"{doc.name} names files that do not exist: {missing}"


@functools.cache
def _defined_flags(module: str) -> set[str]:
  """The flags `python -m <module>` defines: absl DEFINE_* calls in its source
  (its package's modules included) and the ones every entry point shares."""
  name = module.split(".", 1)[1]
  sources = [ROOT / "unclip_jax" / "cli.py"]
  package = ROOT / "unclip_jax" / name
  sources += sorted(package.rglob("*.py")) if package.is_dir() else [
      ROOT / "unclip_jax" / f"{name}.py"]
  flags = {"help", "helpfull"}
  for source in sources:
    flags |= set(re.findall(r"DEFINE_\w+\(\s*\"(\w+)\"", _text(source)))
  return flags


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_command_flags_are_defined(doc):
  wrong = []
  for module, rest in COMMAND.findall(_text(doc)):
    tool = ROOT / "unclip_jax" / module.split(".", 1)[1]
    if not (tool.is_dir() or tool.with_suffix(".py").exists()):
      wrong.append(module)
      continue
    wrong += [f"{module} --{flag}" for flag in FLAG.findall(rest)
              if flag not in _defined_flags(module)]
  assert not wrong, f"{doc.name} shows flags no tool defines: {sorted(set(wrong))}"
