"""Nothing we read back from disk can run code: no pickle, no eval/exec, no unsafe
loaders anywhere in the package or its configs (read from every module's source), and a
workdir's stored config is JSON data."""
import ast
import json
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
SOURCES = sorted([*(ROOT / "unclip_jax").rglob("*.py"), *(ROOT / "configs").rglob("*.py")])

# Modules whose loaders rebuild arbitrary objects (and so run code) from bytes.
UNSAFE_MODULES = {"pickle", "_pickle", "cPickle", "cloudpickle", "dill", "joblib",
                  "marshal", "shelve"}
UNSAFE_BUILTINS = {"eval", "exec", "compile", "__import__"}
# Called as attributes: yaml's full loaders, torch.load, pandas' pickle reader.
UNSAFE_ATTRIBUTES = {"unsafe_load", "full_load", "read_pickle", "load_pickle"}
UNSAFE_QUALIFIED = {("yaml", "load"), ("torch", "load")}
# ... unless restricted to tensors and plain containers: torch's weights-only
# unpickler builds nothing else (what converters read .bin checkpoints with).
SAFE_WITH = {("torch", "load"): ("weights_only", True)}


def _is_false(node: ast.AST) -> bool:
  return isinstance(node, ast.Constant) and node.value is False


def unsafe_uses(source: str) -> list[str]:
  """'line: what' for every unsafe load in `source` (Python code)."""
  found = []
  for node in ast.walk(ast.parse(source)):
    line = getattr(node, "lineno", 0)
    if isinstance(node, ast.Import):
      found += [f"{line}: import {a.name}" for a in node.names
                if a.name.split(".")[0] in UNSAFE_MODULES]
    elif isinstance(node, ast.ImportFrom) and node.module:
      if node.module.split(".")[0] in UNSAFE_MODULES:
        found.append(f"{line}: from {node.module} import")
    elif isinstance(node, ast.Call):
      function = node.func
      if isinstance(function, ast.Name) and function.id in UNSAFE_BUILTINS:
        found.append(f"{line}: {function.id}(")
      if isinstance(function, ast.Attribute):
        owner = function.value.id if isinstance(function.value, ast.Name) else None
        safe = SAFE_WITH.get((owner, function.attr))
        if safe and any(k.arg == safe[0] and isinstance(k.value, ast.Constant)
                        and k.value.value is safe[1] for k in node.keywords):
          continue
        if (function.attr in UNSAFE_ATTRIBUTES
            or (owner, function.attr) in UNSAFE_QUALIFIED):
          found.append(f"{line}: {owner}.{function.attr}(")
      found += [f"{line}: allow_pickle=" for k in node.keywords
                if k.arg == "allow_pickle" and not _is_false(k.value)]
  return found


@pytest.mark.parametrize("snippet", [
    "import pickle", "from dill import loads", "np.load(path, allow_pickle=True)",
    "config = eval(text)", "exec(code)", "yaml.load(stream)", "pd.read_pickle(p)",
    "torch.load(path)", "torch.load(path, weights_only=False)",
])
def test_the_check_sees_each_kind_of_unsafe_load(snippet):
  assert unsafe_uses(snippet), snippet


def test_the_check_lets_safe_loads_through():
  assert not unsafe_uses("np.load(path)\nnp.load(path, allow_pickle=False)\n"
                         "json.load(f)\nstep.lower().compile()\nmodel.eval()\n"
                         "torch.load(path, map_location='cpu', weights_only=True)\n")


def test_nothing_is_unpickled_or_executed_from_data():
  wrong = {str(path.relative_to(ROOT)): uses for path in SOURCES
           if (uses := unsafe_uses(path.read_text()))}
  assert not wrong, wrong


def test_a_stored_config_is_read_as_data(tmp_path):
  from unclip_jax.checkpoints import workdir
  marker = tmp_path / "code_ran"
  code = f"__import__('pathlib').Path({str(marker)!r}).touch()"
  (tmp_path / workdir.CONFIG_FILENAME).write_text(
      json.dumps({"stage": "clip", "name": code}))
  config = workdir.read_config(str(tmp_path), "clip")
  assert config.name == code and not marker.exists()
