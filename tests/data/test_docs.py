"""The pipeline snippet in docs/data.md runs as written (into a temporary data_dir)."""
import pathlib
import re

DOC = pathlib.Path(__file__).parents[2] / "docs" / "data.md"


def test_pipeline_snippet_runs(tmp_path, capsys):
  snippets = re.findall(r"```python\n(.*?)```", DOC.read_text(), re.S)
  snippet = next(s for s in snippets if "make_train_iterator" in s)
  exec(snippet.replace('"/tmp/tfds"', repr(str(tmp_path))), {})  # pylint: disable=exec-used
  assert "(8, 16, 16, 3) float32" in capsys.readouterr().out
