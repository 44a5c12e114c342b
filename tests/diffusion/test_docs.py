"""The usage snippet in docs/diffusion.md runs as written."""
import pathlib
import re

DOC = pathlib.Path(__file__).resolve().parents[2] / "docs" / "diffusion.md"


def test_usage_snippet_runs():
  snippet = re.search(r"```python\n(.*?)```", DOC.read_text(), re.S).group(1)
  namespace = {}
  exec(compile(snippet, str(DOC), "exec"), namespace)  # noqa: S102
  assert namespace["loss"].shape == (8,)
  assert namespace["images"].shape == (4, 16, 16, 3)
  assert float(abs(namespace["images"]).max()) <= 1.0
  assert namespace["eps_moments"].shape == (50,)
  assert namespace["analytic_images"].shape == (4, 16, 16, 3)
