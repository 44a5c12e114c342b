"""python -m unclip_jax.sample: grids and strips end to end (in-process), and
one-line errors (a subprocess, to see exactly what a user sees)."""
import os
import subprocess
import sys

import numpy as np
import pytest
from absl import flags
from PIL import Image

from unclip_jax.errors import UserError
from unclip_jax.sample import __main__ as sample_cli

TILE = 64  # 16 px images are enlarged 4x in the written grids
PAD = 2


def _run(args, capsys):
  """main() with these flags; returns what it printed."""
  flags.FLAGS.unparse_flags()
  argv = flags.FLAGS(["unclip_jax.sample", *args])
  sample_cli.main(argv)
  return capsys.readouterr().out.strip()


def _chain_flags(chain, prior=True):
  args = [f"--clip={chain.clip}", f"--decoder={chain.decoder}",
          f"--upsampler={chain.upsampler}", "--max_batch=8"]
  return args + ([f"--prior={chain.prior}"] if prior else [])


def _read(path):
  return np.asarray(Image.open(path))


def test_generate_writes_a_row_per_prompt(tiny_chain, tmp_path, capsys):
  out = str(tmp_path / "grid.png")
  printed = _run(_chain_flags(tiny_chain) + [
      "--prompt=red apple on a blue background", "--prompt=a cat",
      "--num_images=3", "--seed=0", f"--out={out}"], capsys)
  assert printed == out
  grid = _read(out)
  assert grid.shape[0] == 2 * (TILE + PAD) + PAD  # two rows
  assert grid.shape[1] > 3 * (TILE + PAD)  # three images and the labels


@pytest.mark.parametrize("command, args, tiles", [
    ("variations", ["--num_images=3"], 1 + 3),
    ("interpolate", ["--frames=3"], 2 + 3),
    ("text_diff", ["--from_caption=a red background",
                   "--to_caption=a blue background", "--frames=3",
                   "--decoder_steps=10"], 1 + 3),
])
def test_manipulations_write_strips(tiny_chain, training_records, tmp_path, capsys,
                                    command, args, tiles):
  images = []
  for index in range(2 if command == "interpolate" else 1):
    images.append(str(tmp_path / f"input{index}.png"))
    Image.fromarray(training_records[index]["image"]).save(images[-1])
  out = str(tmp_path / f"{command}.png")
  printed = _run([command, *_chain_flags(tiny_chain, prior=False),
                  *[f"--image={i}" for i in images], *args, f"--out={out}"], capsys)
  assert printed == out
  strip = _read(out)
  assert strip.shape[0] == TILE + 2 * PAD
  # The input image comes first, enlarged like the samples: its first pixel.
  first = np.asarray(Image.open(images[0]).convert("RGB"))[0, 0]
  np.testing.assert_array_equal(strip[PAD + 1, -tiles * (TILE + PAD) + 1], first)


@pytest.mark.parametrize("args, message", [
    (["--prompt=a", "--num_images=0"], "--num_images=0: must be >= 1"),
    (["--num_images=2"], "no --prompt given"),
    (["variations"], "variations takes 1 --image"),
    (["text_diff", "--image=x.png"], "needs --from_caption and --to_caption"),
    (["sideways"], "the command is one of"),
])
def test_bad_flags_fail_before_loading(tiny_chain, tmp_path, capsys, args, message):
  with pytest.raises(UserError, match=message):
    _run(_chain_flags(tiny_chain) + [f"--out={tmp_path / 'x.png'}", *args], capsys)


def test_a_user_sees_one_line_and_exit_status_2(tiny_chain, tmp_path):
  # The prior's workdir passed as the decoder's: refused before any params load.
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  result = subprocess.run(
      [sys.executable, "-m", "unclip_jax.sample", f"--clip={tiny_chain.clip}",
       f"--prior={tiny_chain.prior}", f"--decoder={tiny_chain.prior}",
       "--prompt=a cat", f"--out={tmp_path / 'x.png'}"],
      capture_output=True, text=True, env=env, timeout=120, check=False)
  assert result.returncode == 2, result.stderr
  errors = [line for line in result.stderr.splitlines() if "error" in line.lower()]
  assert errors == [f"error: {tiny_chain.prior} holds a 'prior' run, not a "
                    "'decoder' run; pass the decoder stage's workdir"], result.stderr
  assert "Traceback" not in result.stderr
  assert not os.path.exists(tmp_path / "x.png")
