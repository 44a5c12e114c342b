"""The demo's scheduler and its model-free evaluation (the full demo is timed by
hand: docs/demo.md)."""
import json
import os
import sys

import numpy as np
import pytest

from unclip_jax.data import scenes
from unclip_jax.demo import evaluate, plan
from unclip_jax.parallel import distributed


def test_held_out_prompts_are_held_out_by_every_stage():
  prompts = evaluate.held_out_prompts(num_emoji=16, clip_num_emoji=256, seed=0)
  triples = set(zip(*(prompts.labels[k].tolist() for k in
                      ("emoji_index", "color_index", "position_index"))))
  decoder_train, _ = scenes.split_combinations(16, 0)
  clip_train, _ = scenes.split_combinations(256, 0)
  assert triples and not triples & (set(decoder_train) | set(clip_train))
  assert len(prompts.captions) == len(triples) and len(prompts.emoji_names) == 16
  e, c, p = next(iter(zip(*(prompts.labels[k] for k in
                            ("emoji_index", "color_index", "position_index")))))
  assert prompts.captions[0] == scenes.caption(
      prompts.emoji_names[e], scenes.COLOR_NAMES[c], scenes.POSITIONS[p])


def test_true_images_score_perfectly_and_shuffled_ones_do_not():
  prompts = evaluate.held_out_prompts(num_emoji=8, clip_num_emoji=64, seed=0)
  truth = evaluate.true_images(prompts, seed=0, resolution=16)
  assert evaluate.score(truth, prompts, 1, seed=0) == {
      "color_accuracy": 1.0, "position_accuracy": 1.0, "identity_accuracy": 1.0,
      "scene_accuracy": 1.0}
  shuffled = evaluate.score(truth[::-1], prompts, 1, seed=0)
  assert shuffled["scene_accuracy"] < 0.5
  doubled = evaluate.score(np.repeat(truth, 2, axis=0), prompts, 2, seed=0)
  assert doubled["scene_accuracy"] == 1.0


def _write_metrics(workdir, steps):
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, "metrics.jsonl"), "w") as f:
    for step in steps:
      f.write(json.dumps({"step": step, "train/loss": 0.5}) + "\n")


def test_progress_is_read_from_metrics_and_checkpoints(tmp_path):
  workdir = str(tmp_path / "clip")
  assert plan.logged_step(workdir) == 0 and plan.trained_steps(workdir) == 0
  _write_metrics(workdir, [25, 50, 75])
  assert plan.logged_step(workdir) == 75
  for name in ("100", "200", "300.orbax-checkpoint-tmp-12"):
    os.makedirs(os.path.join(workdir, "checkpoints", name))
  assert plan.trained_steps(workdir) == 200


class _Script(plan.StageRun):
  """A stage whose command is a tiny Python script: writes its metrics line and
  records the order it ran in (or fails)."""

  def command(self, root):
    code = (f"import json,os; os.makedirs({self.workdir(root)!r}, exist_ok=True); "
            f"open(os.path.join({root!r}, 'order'), 'a').write({self.name!r} + ' '); "
            f"os.makedirs(os.path.join({self.workdir(root)!r}, 'checkpoints', '1')); "
            f"raise SystemExit({int(self.name == 'broken')})")
    return [sys.executable, "-c", code]


@pytest.fixture
def one_step_stages(monkeypatch):
  monkeypatch.setattr(plan, "total_steps", lambda name: 1)


def test_stages_run_after_what_they_read_and_finished_ones_are_skipped(
    tmp_path, one_step_stages):
  root = str(tmp_path)
  stages = (_Script("a", after=()),
            _Script("b", after=("a",)),
            _Script("c", after=()))
  events = []
  assert plan.run_all(root, events.append, stages=stages, max_parallel=1) == []
  order = open(os.path.join(root, "order")).read().split()
  assert order == ["a", "b", "c"]  # priority order, dependencies first
  assert "a done" in events and "c done" in events
  events.clear()
  assert plan.run_all(root, events.append, stages=stages) == ["a", "b", "c"]
  assert open(os.path.join(root, "order")).read().split() == order  # all skipped
  assert [e for e in events if isinstance(e, str)] == [
      "already trained (a checkpoint at the preset's last step), so skipped: a, b, c"]


def test_the_record_says_which_stages_trained_and_keeps_the_training_time():
  names = ["a", "b"]
  assert plan.training_record(names, [], 61.23, None) == {
      "stages": {"a": "trained", "b": "trained"}, "train_seconds": 61.2}
  assert plan.training_record(names, ["a"], 30.0, {"train_seconds": 61.2}) == {
      "stages": {"a": "already trained", "b": "trained"}, "train_seconds": 30.0}
  # A rerun that trained nothing keeps the time that trained them, not 0.
  rerun = plan.training_record(names, names, 0.01, {"train_seconds": 61.2})
  assert rerun == {"stages": {"a": "already trained", "b": "already trained"},
                   "train_seconds": 61.2}
  assert plan.training_record(names, names, 0.01, None)["train_seconds"] is None


def test_a_failed_stage_is_named_with_its_log(tmp_path, one_step_stages):
  with pytest.raises(plan.StageFailed, match=r"the broken stage failed \(exit 1\)"
                     r".*logs/broken.log") as raised:
    plan.run_all(str(tmp_path), lambda event: None,
                 stages=(_Script("broken", after=()),))
  assert raised.value.resumable  # a crash: a rerun resumes


class _BadInput(plan.StageRun):
  def command(self, root):
    return [sys.executable, "-c", "import sys; print('error: set --config.x', "
            "file=sys.stderr); sys.exit(2)"]


def test_a_stage_refusing_its_input_is_not_called_resumable(tmp_path,
                                                            one_step_stages):
  with pytest.raises(plan.StageFailed, match=r"\(exit 2\): error: set --config.x"
                     ) as raised:
    plan.run_all(str(tmp_path), lambda event: None, stages=(_BadInput("bad", after=()),))
  assert not raised.value.resumable  # its one line names the fix; a rerun repeats it


def test_stage_processes_run_on_cpu_unless_the_user_or_the_host_says_otherwise():
  chosen = distributed.cpu_only_unless_accelerated({"PATH": "/bin"})
  assert chosen["JAX_PLATFORMS"] == "cpu" and chosen["PATH"] == "/bin"  # no TPU here
  assert distributed.cpu_only_unless_accelerated({"JAX_PLATFORMS": "cuda"}) == {
      "JAX_PLATFORMS": "cuda"}


def test_the_demo_chain_ends_at_64_px_through_two_upsamplers():
  """The paper's chain in small: decoder 16 px -> 32 px -> 64 px, each
  upsampler reading the side the stage before it makes."""
  import importlib  # pylint: disable=import-outside-toplevel
  by_name = {stage.name: stage for stage in plan.STAGES}
  assert plan.UPSAMPLERS == ("upsampler", "upsampler2")
  side = importlib.import_module("configs.decoder").get_config("demo").data.resolution
  for name in plan.UPSAMPLERS:
    stage = by_name[name]
    config = importlib.import_module(f"configs.{stage.config_name}").get_config(
        stage.preset)
    assert config.model.low_res == side
    side = config.data.resolution
    assert f"--config={stage.config_name}.py:{stage.preset}" in " ".join(
        stage.command("/root")).replace(os.path.dirname(
            importlib.import_module("configs").__file__) + "/", "")
  assert side == 64
