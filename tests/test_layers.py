"""No import runs back up the layers (docs/architecture.md): read from every
module's source, imports inside functions included."""
import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "unclip_jax"

# Package -> the unclip_jax packages it must never import.
_ABOVE_GENERATORS = {"stages", "train", "pipeline", "sample", "demo", "compile",
                     "bench"}
FORBIDDEN = {
    "models": {"generators", "checkpoints", "data"} | _ABOVE_GENERATORS,
    "diffusion": {"models", "generators", "checkpoints", "data"} | _ABOVE_GENERATORS,
    "parallel": {"models", "diffusion", "generators", "checkpoints", "data"}
                | _ABOVE_GENERATORS,
    "data": {"generators", "checkpoints"} | _ABOVE_GENERATORS,
    "checkpoints": {"generators"} | _ABOVE_GENERATORS,
    "generators": _ABOVE_GENERATORS,
    "stages": {"train", "pipeline", "sample", "demo", "compile", "bench"},
    "pipeline": {"stages", "train", "sample", "demo", "compile", "bench"},
    "sample": {"stages", "train", "demo", "compile", "bench"},
    "convert": {"stages", "train", "pipeline", "sample", "demo", "compile", "bench"},
}


def _imported_packages(path: pathlib.Path) -> set[str]:
  """The unclip_jax subpackages (or top-level modules) `path` imports."""
  found = set()
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.Import):
      names = [alias.name for alias in node.names]
    elif isinstance(node, ast.ImportFrom) and node.module:
      names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
    else:
      continue
    for name in names:
      parts = name.split(".")
      if parts[0] == "unclip_jax" and len(parts) > 1:
        found.add(parts[1])
  return found


def _modules(package: str) -> list[pathlib.Path]:
  return sorted((PACKAGE / package).rglob("*.py"))


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_no_import_runs_back_up_the_layers(package):
  wrong = {}
  for path in _modules(package):
    bad = _imported_packages(path) & FORBIDDEN[package]
    if bad:
      wrong[str(path.relative_to(PACKAGE))] = sorted(bad)
  assert not wrong, wrong


def test_every_package_has_a_rule():
  packages = {p.name for p in PACKAGE.iterdir()
              if p.is_dir() and (p / "__init__.py").exists()}
  # train/, demo/ and bench/ sit at the top: they may import anything.
  assert packages - {"train", "demo", "bench"} <= set(FORBIDDEN), packages
