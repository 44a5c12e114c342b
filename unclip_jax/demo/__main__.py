"""python -m unclip_jax.demo --workdir DIR

Trains CLIP, the two upsamplers (16 -> 32, 32 -> 64), the decoder (16 px) and
the prior at their demo presets on the bundled emoji_scenes data (DIR/clip,
DIR/upsampler, DIR/upsampler2, DIR/decoder, DIR/prior), resuming wherever a
previous run stopped, then samples the prompts that every stage held out through
the whole chain (unclip_jax.UnCLIPPipeline) at 64 px and scores them without
any model: DIR/samples.png, DIR/demo_eval.json.
"""
import json
import os
import signal
import sys
import time

from absl import flags

from unclip_jax import cli
from unclip_jax.errors import UserError

_WORKDIR = flags.DEFINE_string("workdir", None, "where the demo's stages live")
_NUM_IMAGES = flags.DEFINE_integer("num_images", 2, "samples per held-out prompt")
_SEED = flags.DEFINE_integer("seed", 0, "sampling seed")


def _format_minutes(seconds: float) -> str:
  return f"{int(seconds // 60)}m{int(seconds % 60):02d}s"


class _Reporter:
  """Prints stage starts and ends at once, and every ~30 s each running
  stage's step and ETA."""

  def __init__(self, started: float):
    self.started, self.last = started, time.monotonic()

  def _stamp(self) -> str:
    return f"[{_format_minutes(time.monotonic() - self.started)}]"

  def __call__(self, event):
    if isinstance(event, str):
      print(f"{self._stamp()} {event}", flush=True)
      return
    if time.monotonic() - self.last < 30 or not event:
      return
    self.last = time.monotonic()
    parts = []
    for name, (step, total, rate) in event.items():
      eta = _format_minutes((total - step) / rate) if rate else "estimating"
      parts.append(f"{name} step {step}/{total}, eta {eta}")
    print(f"{self._stamp()} " + "; ".join(parts), flush=True)


def _read_json(path: str) -> dict | None:
  """An earlier run's record, or None (missing or unreadable)."""
  try:
    with open(path) as f:
      record = json.load(f)
  except (OSError, ValueError):
    return None
  return record if isinstance(record, dict) else None


def main(argv):
  del argv
  from unclip_jax.demo import evaluate, plan  # pylint: disable=import-outside-toplevel
  from unclip_jax.train.config_checks import make_writable_dir  # pylint: disable=import-outside-toplevel
  # A `kill` ends the demo the way Ctrl-C does: through run_all's cleanup, which
  # stops the stage processes (each resumes from its checkpoint on a rerun).
  signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
  if _NUM_IMAGES.value < 1:
    raise UserError(f"--num_images={_NUM_IMAGES.value}: must be >= 1")
  root = os.path.abspath(_WORKDIR.value)
  make_writable_dir(root)  # before the first stage starts, not in its log
  started = time.monotonic()
  try:
    skipped = plan.run_all(root, _Reporter(started))
  except plan.StageFailed as e:
    raise UserError(f"{e}; rerun the same command to resume" if e.resumable
                    else str(e)) from None
  train_seconds = time.monotonic() - started

  print(f"[{_format_minutes(train_seconds)}] sampling the held-out prompts",
        flush=True)
  result = evaluate.run(root, num_images=_NUM_IMAGES.value, seed=_SEED.value)
  total = time.monotonic() - started
  path = os.path.join(root, "demo_eval.json")
  result.update(plan.training_record([s.name for s in plan.STAGES], skipped,
                                     train_seconds, _read_json(path)))
  result.update(total_seconds=round(total, 1))
  with open(path + ".tmp", "w") as f:
    json.dump(result, f, indent=1)
  os.replace(path + ".tmp", path)
  a = result["accuracy"]
  print(f"held-out prompts: {len(result['prompts'])} x {_NUM_IMAGES.value} images; "
        f"colour {a['color']:.0%}, position {a['position']:.0%}, "
        f"identity {a['identity']:.0%} (of {len(result['emoji_names'])} emoji)")
  print(f"done in {_format_minutes(total)} (this run). Samples: "
        f"{result['samples_png']}; scores: {path}")


if __name__ == "__main__":
  flags.mark_flags_as_required(["workdir"])
  cli.run(main)
