"""Sharding coverage: every paper preset's params are split over fsdp (checked
on abstract params: nothing is allocated), per-device bytes fall as 1/fsdp,
and a rule set that replicates the model is refused with one line."""
import jax
import pytest
from jax.sharding import PartitionSpec

from configs import clip, decoder, prior, upsampler
from unclip_jax.compile import stage_for_compile
from unclip_jax.errors import ConfigError
from unclip_jax.parallel import coverage, partitioning
from unclip_jax.parallel.axes import DEFAULT_RULES
from unclip_jax.parallel.mesh import make_mesh
from unclip_jax.train import setup as setup_lib
from unclip_jax.train import step as step_lib

PAPER = {"clip": (clip, "paper"), "prior": (prior, "paper"),
         "decoder": (decoder, "paper"), "upsampler_256": (upsampler, "paper"),
         "upsampler_1024": (upsampler, "paper_1024")}


@pytest.fixture(scope="module")
def paper_params():
  """Abstract (boxed) params and rules of every paper preset."""
  found = {}
  for name, (module, preset) in PAPER.items():
    config = module.get_config(preset)
    stage = stage_for_compile(config, clip.get_config("paper"))
    found[name] = (jax.eval_shape(stage.init_params, jax.random.key(0)),
                   partitioning.rules_from_config(config.mesh.rules))
  return found


def test_rules_fall_back_when_an_axis_is_missing_taken_or_uneven():
  mesh = {"data": 2, "fsdp": 4, "tensor": 1}
  resolve = lambda names, shape: partitioning.resolve_spec(
      names, shape, mesh, DEFAULT_RULES)
  # No tensor parallelism: an MLP bias falls back to fsdp ...
  assert resolve(("mlp",), (64,)) == PartitionSpec("fsdp")
  # ... unless the width already took it.
  assert resolve(("embed", "mlp"), (32, 64)) == PartitionSpec("fsdp", None)
  # A dimension fsdp does not divide stays whole.
  assert resolve(("embed",), (6,)) == PartitionSpec(None)
  tensor = {"data": 1, "fsdp": 4, "tensor": 2}
  assert partitioning.resolve_spec(("embed", "heads", "kv"), (32, 4, 8),
                                   tensor, DEFAULT_RULES) == PartitionSpec(
                                       "fsdp", "tensor", None)


@pytest.mark.parametrize("name", sorted(PAPER))
def test_every_param_has_logical_axis_names(paper_params, name):
  params, rules = paper_params[name]
  unnamed = [p.path for p in coverage.placements(params, make_mesh((8, 1, 1)),
                                                 rules) if p.names is None]
  assert not unnamed


@pytest.mark.parametrize("name", sorted(PAPER))
@pytest.mark.parametrize("mesh_shape", [(1, 8, 1), (2, 2, 2)])
def test_paper_presets_pass_the_coverage_check(paper_params, name, mesh_shape):
  params, rules = paper_params[name]
  fraction = coverage.check_coverage(params, make_mesh(mesh_shape), rules)
  assert fraction < 0.01


@pytest.mark.parametrize("name", sorted(PAPER))
def test_bytes_per_device_fall_as_one_over_fsdp(paper_params, name):
  params, rules = paper_params[name]
  total = coverage.summary(params, make_mesh((8, 1, 1)), rules)["param_bytes"]
  for fsdp in (1, 2, 4, 8):
    per_device = coverage.bytes_per_device(
        params, make_mesh((8 // fsdp, fsdp, 1)), rules)
    assert per_device == pytest.approx(total / fsdp, rel=0.01), fsdp


def test_a_rule_set_that_replicates_the_model_is_refused_in_one_line(
    paper_params):
  params, _ = paper_params["prior"]
  activations_only = tuple(r for r in DEFAULT_RULES
                           if r[0].startswith("activation"))
  with pytest.raises(ConfigError) as error:
    coverage.check_coverage(params, make_mesh((2, 4, 1)), activations_only)
  message = str(error.value)
  assert "\n" not in message
  assert "100.0% of parameter bytes" in message and "fsdp=4" in message
  # The largest replicated param is named, with the rule that would split it.
  assert "transformer/blocks/mlp/fc_in/kernel" in message
  assert "add the rule ('embed', 'fsdp') to mesh.rules" in message


def test_setup_runs_the_check_before_compiling(monkeypatch):
  """The loop, compile and bench all set up through train.setup: it refuses a
  replicating rule set before anything is compiled."""
  config = prior.get_config("tiny")
  config.mesh.rules = (("embed", None),)
  stage = stage_for_compile(config, clip.get_config("tiny"))

  def never(*args, **kwargs):
    raise AssertionError("compiled before the coverage check")
  monkeypatch.setattr(step_lib, "compile_train_step", never)
  with pytest.raises(ConfigError, match="replicated"):
    setup_lib.setup(config, stage, make_mesh((2, 4, 1)))
  # Without fsdp nothing is refused: data parallelism replicates on purpose.
  params = jax.eval_shape(stage.init_params, jax.random.key(0))
  setup_lib.check_sharding(params, make_mesh((8, 1, 1)), config.mesh.rules, config)
