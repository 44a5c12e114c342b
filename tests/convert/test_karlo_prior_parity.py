"""Karlo's prior: a random tiny diffusers PriorTransformer, saved and
converted, predicts what diffusers predicts; the converter accounts for every
tensor and refuses configs it cannot reproduce."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")
from diffusers import PriorTransformer  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from unclip_jax.convert.karlo_prior import (  # noqa: E402
    KARLO_PRIOR, convert_karlo_prior, karlo_prior_kwargs_from_diffusers_config)
from unclip_jax.convert.tensors import (  # noqa: E402
    TensorSource, read_state_dict)
from unclip_jax.errors import ConversionError  # noqa: E402
from unclip_jax.models.karlo_prior import KarloPrior  # noqa: E402
from unclip_jax.parallel.axes import DEFAULT_RULES  # noqa: E402
from unclip_jax.parallel.mesh import make_mesh  # noqa: E402
from unclip_jax.parallel.partitioning import logical_specs  # noqa: E402

LENGTH = 7
# Karlo's options (diffusers' defaults) at tiny size.
KARLO_TINY = dict(num_attention_heads=2, attention_head_dim=8, num_layers=2,
                  embedding_dim=16, num_embeddings=LENGTH,
                  additional_embeddings=4)
# Every other option the converter supports, away from its default.
OPTIONS_TINY = dict(num_attention_heads=2, attention_head_dim=12, num_layers=2,
                    embedding_dim=16, num_embeddings=LENGTH,
                    additional_embeddings=4, time_embed_act_fn="gelu",
                    norm_in_type="layer", embedding_proj_norm_type="layer",
                    time_embed_dim=20, embedding_proj_dim=10, clip_embed_dim=14)
TIMESTEPS = [0, 17, 999, 500]
TEXT_LENGTHS = [7, 3, 1, 0]  # the last row all padding


def _reference(config: dict, seed: int) -> PriorTransformer:
  """A diffusers prior with every parameter (zero-initialised ones too)
  perturbed; clip_std kept positive."""
  torch.manual_seed(seed)
  model = PriorTransformer(**config).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      p.add_(0.3 * torch.randn_like(p))
      if name == "clip_std":
        p.abs_().add_(0.5)
  return model


def _saved(model, tmp_path, state=None) -> str:
  path = str(tmp_path / "prior.safetensors")
  state = model.state_dict() if state is None else state
  save_file({k: v.contiguous() for k, v in state.items()}, path)
  return path


def _inputs(config: dict, seed: int = 0):
  rng = np.random.default_rng(seed)
  batch, dim = len(TIMESTEPS), config["embedding_dim"]
  text_dim = config.get("embedding_proj_dim") or dim
  normal = lambda *shape: rng.normal(size=shape).astype(np.float32)
  mask = np.arange(LENGTH)[None] < np.array(TEXT_LENGTHS)[:, None]
  return (normal(batch, dim), np.array(TIMESTEPS, np.int32),
          normal(batch, text_dim), normal(batch, LENGTH, dim), mask)


def _diffusers_prediction(model, inputs) -> np.ndarray:
  x_t, t, text_embedding, text_encodings, mask = inputs
  with torch.no_grad():
    out = model(torch.from_numpy(x_t), torch.from_numpy(t.astype(np.int64)),
                proj_embedding=torch.from_numpy(text_embedding),
                encoder_hidden_states=torch.from_numpy(text_encodings),
                attention_mask=torch.from_numpy(mask))
  return out.predicted_image_embedding.numpy()


def _close(ours, ref):
  ours, ref = np.asarray(ours), np.asarray(ref)
  assert ours.dtype == np.float32 and ours.shape == ref.shape
  np.testing.assert_allclose(ours, ref, rtol=1e-4,
                             atol=1e-5 * np.abs(ref).max())


def _converted(config, tmp_path, scan_layers=True, seed=0):
  reference = _reference(config, seed)
  kwargs = {**karlo_prior_kwargs_from_diffusers_config(dict(reference.config)),
            "scan_layers": scan_layers}
  source = TensorSource(read_state_dict(_saved(reference, tmp_path)), "prior")
  return reference, kwargs, convert_karlo_prior(source, kwargs)


def test_karlo_config_matches_diffusers(tmp_path):
  """Karlo's options: the full forward, the cached-caption path and
  `unnormalize` against diffusers."""
  reference, kwargs, params = _converted(KARLO_TINY, tmp_path)
  model = KarloPrior(**kwargs)
  inputs = _inputs(KARLO_TINY)
  variables = {"params": params}
  ref = _diffusers_prediction(reference, inputs)
  _close(jax.jit(model.apply)(variables, *inputs), ref)

  x_t, t, text_embedding, text_encodings, mask = inputs

  @jax.jit
  def cached(variables):
    prefix = model.apply(variables, text_embedding, text_encodings, mask,
                         method=KarloPrior.encode_prefix)
    return model.apply(variables, x_t, t, prefix,
                       method=KarloPrior.predict_from_prefix)
  _close(cached(variables), ref)

  with torch.no_grad():
    ref_latents = reference.post_process_latents(torch.from_numpy(ref)).numpy()
  _close(model.apply(variables, ref, method=KarloPrior.unnormalize),
         ref_latents)
  np.testing.assert_allclose(
      model.apply(variables, ref_latents, method=KarloPrior.normalize), ref,
      rtol=1e-4, atol=1e-5 * np.abs(ref).max())


def test_other_options_match_diffusers(tmp_path):
  """norm_in, the text-embedding norm, a GELU timestep MLP and widths other
  than embedding_dim, unscanned."""
  reference, kwargs, params = _converted(OPTIONS_TINY, tmp_path,
                                         scan_layers=False, seed=1)
  assert kwargs["time_activation"] == "gelu" and kwargs["norm_in"]
  inputs = _inputs(OPTIONS_TINY, seed=1)
  ours = jax.jit(KarloPrior(**kwargs).apply)({"params": params}, *inputs)
  _close(ours, _diffusers_prediction(reference, inputs))


@pytest.mark.parametrize("config,scan_layers", [(KARLO_TINY, True),
                                                (OPTIONS_TINY, False)])
def test_converted_tree_is_the_init_tree(tmp_path, config, scan_layers):
  _, kwargs, params = _converted(config, tmp_path, scan_layers)
  model = KarloPrior(**kwargs)
  inputs = [jnp.asarray(a) for a in _inputs(config)]
  abstract = nn.unbox(jax.eval_shape(model.init, jax.random.key(0),
                                     *inputs)["params"])
  shape_of = lambda tree: jax.tree.map(lambda a: tuple(a.shape), tree)
  assert jax.tree.structure(params) == jax.tree.structure(abstract)
  assert shape_of(params) == shape_of(abstract)


@pytest.mark.parametrize("change,key", [
    ("missing", "transformer_blocks.1.attn1.to_k.bias"),
    ("unused", "transformer_blocks.2.norm1.weight"),
    ("misshaped", "positional_embedding"),
])
def test_tensor_problems_name_the_tensor(tmp_path, change, key):
  reference = _reference(KARLO_TINY, 0)
  state = dict(reference.state_dict())
  if change == "missing":
    del state[key]
  elif change == "unused":
    state[key] = torch.ones(16)
  else:
    state[key] = state[key][:, :-1]
  kwargs = karlo_prior_kwargs_from_diffusers_config(dict(reference.config))
  source = TensorSource(read_state_dict(_saved(reference, tmp_path, state)),
                        "prior")
  with pytest.raises(ConversionError, match=key.replace(".", r"\.")):
    convert_karlo_prior(source, kwargs)


def test_karlo_preset_is_diffusers_defaults():
  """Karlo's conversion script builds PriorTransformer() with no arguments;
  at that size the model has diffusers' parameter count and its params shard
  by their logical axes (abstract only: nothing is allocated)."""
  config = {"_class_name": "PriorTransformer", "_diffusers_version": "0.12.0"}
  assert karlo_prior_kwargs_from_diffusers_config(config) == KARLO_PRIOR
  model = KarloPrior(**KARLO_PRIOR)
  inputs = (jnp.zeros((2, 768)), jnp.zeros((2,), jnp.int32),
            jnp.zeros((2, 768)), jnp.zeros((2, 77, 768)),
            jnp.ones((2, 77), bool))
  abstract = jax.eval_shape(model.init, jax.random.key(0), *inputs)
  sizes = [a.size for a in jax.tree.leaves(nn.unbox(abstract))]
  # sum(p.numel() for p in PriorTransformer().parameters())
  assert sum(sizes) == 1_022_030_080
  specs = logical_specs(abstract, make_mesh((2, 2, 2)), DEFAULT_RULES)
  kernel = specs["params"]["transformer"]["blocks"]["mlp"]["fc_in"]["kernel"]
  assert tuple(kernel) == (None, "fsdp", "tensor")


@pytest.mark.parametrize("field,value", [
    ("added_emb_type", None), ("encoder_hid_proj_type", None),
    ("additional_embeddings", 3), ("norm_in_type", "rms"),
    ("embedding_proj_norm_type", "group"), ("time_embed_act_fn", "tanh"),
    ("some_new_option", 1), ("_class_name", "UNet2DModel"),
])
def test_unsupported_config_names_the_field(field, value):
  with pytest.raises(ConversionError, match=field):
    karlo_prior_kwargs_from_diffusers_config({**KARLO_TINY, field: value})
