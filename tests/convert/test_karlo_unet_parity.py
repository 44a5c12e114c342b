"""Karlo's decoder / text projection / super-resolution UNets against diffusers.

Tiny random diffusers models with the block types and options of Karlo's real
configs (every parameter perturbed, so zero-initialised layers hide nothing),
saved to safetensors, converted, and run on the same inputs as diffusers.
"""
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")
pytest.importorskip("safetensors")

from unclip_jax.convert.karlo_unet import (  # noqa: E402
    convert_karlo_text_proj, convert_karlo_unet,
    karlo_text_proj_kwargs_from_diffusers_config,
    karlo_unet_kwargs_from_diffusers_config)
from unclip_jax.convert.tensors import TensorSource, read_state_dict  # noqa: E402
from unclip_jax.errors import ConversionError  # noqa: E402
from unclip_jax.models.karlo_text_proj import KarloTextProj  # noqa: E402
from unclip_jax.models.karlo_unet import KarloUNet  # noqa: E402

HALF, SIDE, TEXT_LENGTH, CLIP_DIM, CROSS_DIM = 2, 16, 6, 24, 32
TIMESTEPS = np.array([0, 17, 503, 999])
TEXT_LENGTHS = np.array([1, 4, 6, 2])  # real tokens per row; the rest is padding

# Karlo's real configs (diffusers' scripts/convert_kakao_brain_unclip_to_diffusers.py)
# at tiny widths: three levels so that every block type appears with and without
# its resampler.
DECODER = dict(
    sample_size=SIDE, in_channels=3, out_channels=6, layers_per_block=2,
    down_block_types=("ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D",
                      "SimpleCrossAttnDownBlock2D"),
    up_block_types=("SimpleCrossAttnUpBlock2D", "SimpleCrossAttnUpBlock2D",
                    "ResnetUpsampleBlock2D"),
    mid_block_type="UNetMidBlock2DSimpleCrossAttn", block_out_channels=(16, 32, 48),
    norm_num_groups=8, cross_attention_dim=CROSS_DIM, class_embed_type="identity",
    attention_head_dim=8, resnet_time_scale_shift="scale_shift")
TEXT_PROJ = dict(clip_embeddings_dim=CLIP_DIM, time_embed_dim=64,
                 cross_attention_dim=CROSS_DIM)
SUPER_RES = dict(
    sample_size=SIDE, layers_per_block=2, in_channels=6, out_channels=3,
    down_block_types=("ResnetDownsampleBlock2D",) * 3,
    up_block_types=("ResnetUpsampleBlock2D",) * 3, block_out_channels=(16, 32, 48),
    norm_num_groups=8, add_attention=False)


def _perturbed(model, seed: int):
  generator = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.05 * torch.randn(p.shape, generator=generator))
  return model.eval()


def _saved(tmp_path_factory, name: str, model):
  from safetensors.torch import save_file
  path = str(tmp_path_factory.mktemp(name) / "model.safetensors")
  save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path)
  return path, json.loads(model.to_json_string())


@pytest.fixture(scope="module")
def models(tmp_path_factory):
  from diffusers import UNet2DConditionModel, UNet2DModel
  from diffusers.pipelines.deprecated.unclip.text_proj import UnCLIPTextProjModel
  torch.manual_seed(0)
  built = {"decoder": UNet2DConditionModel(**DECODER),
           "text_proj": UnCLIPTextProjModel(**TEXT_PROJ),
           "super_res_first": UNet2DModel(**SUPER_RES),
           "super_res_last": UNet2DModel(**SUPER_RES),
           # diffusers' own tiny unCLIP test keeps the mid-block self-attention.
           "super_res_attention": UNet2DModel(**{**SUPER_RES, "add_attention": True})}
  return {name: (_perturbed(model, seed),) + _saved(tmp_path_factory, name, model)
          for seed, (name, model) in enumerate(built.items())}


def _convert_unet(path, config):
  kwargs = karlo_unet_kwargs_from_diffusers_config(config)
  return kwargs, convert_karlo_unet(TensorSource(read_state_dict(path), path), kwargs)


def _nhwc(x):
  return np.asarray(x).transpose(0, 2, 3, 1)


def _assert_close(ours, ref):
  ours, ref = np.asarray(ours), np.asarray(ref)
  assert ours.shape == ref.shape
  np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-5 * np.abs(ref).max())


def _inputs():
  rng = np.random.default_rng(0)
  rows = 2 * HALF
  return dict(
      image_embeddings=rng.normal(size=(HALF, CLIP_DIM)).astype(np.float32),
      prompt_embeds=rng.normal(size=(rows, CLIP_DIM)).astype(np.float32),
      text_hidden=rng.normal(size=(rows, TEXT_LENGTH, CLIP_DIM)).astype(np.float32),
      text_mask=np.arange(TEXT_LENGTH)[None] < TEXT_LENGTHS[:, None],
      sample=rng.normal(size=(rows, 3, SIDE, SIDE)).astype(np.float32),
      low_res=rng.normal(size=(rows, 3, SIDE, SIDE)).astype(np.float32))


def test_text_proj_and_decoder_match_diffusers(models):
  inputs = _inputs()
  text_proj, path, config = models["text_proj"]
  decoder, decoder_path, decoder_config = models["decoder"]
  with torch.no_grad():
    # Guidance as the pipeline runs it: the first half is the unconditional batch.
    ref_context, ref_time = text_proj(
        image_embeddings=torch.from_numpy(inputs["image_embeddings"]),
        prompt_embeds=torch.from_numpy(inputs["prompt_embeds"]),
        text_encoder_hidden_states=torch.from_numpy(inputs["text_hidden"]),
        do_classifier_free_guidance=True)
    extra = text_proj.clip_extra_context_tokens
    mask = np.concatenate([np.ones((2 * HALF, extra), bool), inputs["text_mask"]], 1)
    ref_eps = decoder(torch.from_numpy(inputs["sample"]), torch.from_numpy(TIMESTEPS),
                      encoder_hidden_states=ref_context, class_labels=ref_time,
                      attention_mask=torch.from_numpy(mask)).sample

  kwargs = karlo_text_proj_kwargs_from_diffusers_config(config)
  params = convert_karlo_text_proj(TensorSource(read_state_dict(path), path), kwargs)
  # Rows to be dropped carry some other embedding: the null one must replace it.
  image = np.concatenate([inputs["prompt_embeds"][:HALF], inputs["image_embeddings"]])
  drop = np.arange(2 * HALF) < HALF
  context, time_emb = jax.jit(KarloTextProj(**kwargs).apply)(
      {"params": params}, image, inputs["prompt_embeds"], inputs["text_hidden"], drop)
  _assert_close(context, ref_context)
  _assert_close(time_emb, ref_time)

  unet_kwargs, unet_params = _convert_unet(decoder_path, decoder_config)
  eps = jax.jit(KarloUNet(**unet_kwargs).apply)(
      {"params": unet_params}, _nhwc(inputs["sample"]), TIMESTEPS.astype(np.int32),
      np.asarray(ref_context), np.asarray(ref_time), mask)
  assert eps.shape == (2 * HALF, SIDE, SIDE, 6)
  _assert_close(eps, _nhwc(ref_eps))


def test_super_res_unets_match_diffusers(models):
  inputs = _inputs()
  x = np.concatenate([inputs["sample"], inputs["low_res"]], axis=1)
  first_kwargs, _ = _convert_unet(*models["super_res_first"][1:])
  last_kwargs, _ = _convert_unet(*models["super_res_last"][1:])
  assert first_kwargs == last_kwargs  # one architecture, as in Karlo
  apply = {}
  for name in ("super_res_first", "super_res_last", "super_res_attention"):
    model, path, config = models[name]
    with torch.no_grad():
      ref = model(torch.from_numpy(x), torch.from_numpy(TIMESTEPS)).sample
    kwargs, params = _convert_unet(path, config)
    key = json.dumps(kwargs, sort_keys=True)
    apply.setdefault(key, jax.jit(KarloUNet(**kwargs).apply))  # jit once per shape
    out = apply[key]({"params": params}, _nhwc(x), TIMESTEPS.astype(np.int32))
    _assert_close(out, _nhwc(ref))
  assert len(apply) == 2


@pytest.mark.parametrize("name", ["decoder", "super_res_first", "super_res_attention"])
def test_converted_tree_is_the_init_tree(models, name):
  kwargs, params = _convert_unet(*models[name][1:])
  rows = 2
  x = jnp.zeros((rows, SIDE, SIDE, kwargs["in_channels"]))
  extra = ()
  if kwargs["cross_attention_dim"]:
    extra = (jnp.zeros((rows, 5, CROSS_DIM)), jnp.zeros((rows, 64)),
             jnp.ones((rows, 5), bool))
  shapes = nn.unbox(jax.eval_shape(KarloUNet(**kwargs).init, jax.random.key(0), x,
                                   jnp.zeros((rows,), jnp.int32), *extra))["params"]
  _assert_same_tree(params, shapes)


def test_converted_text_proj_tree_is_the_init_tree(models):
  _, path, config = models["text_proj"]
  kwargs = karlo_text_proj_kwargs_from_diffusers_config(config)
  params = convert_karlo_text_proj(TensorSource(read_state_dict(path), path), kwargs)
  rows = 2
  shapes = nn.unbox(jax.eval_shape(
      KarloTextProj(**kwargs).init, jax.random.key(0), jnp.zeros((rows, CLIP_DIM)),
      jnp.zeros((rows, CLIP_DIM)), jnp.zeros((rows, 3, CLIP_DIM)),
      jnp.zeros((rows,), bool)))["params"]
  _assert_same_tree(params, shapes)


def _assert_same_tree(params, shapes):
  assert (jax.tree_util.tree_structure(params)
          == jax.tree_util.tree_structure(shapes))
  for (where, ours), theirs in zip(jax.tree_util.tree_leaves_with_path(params),
                                   jax.tree_util.tree_leaves(shapes)):
    assert ours.shape == theirs.shape, jax.tree_util.keystr(where)
    assert ours.dtype == np.float32, jax.tree_util.keystr(where)


@pytest.mark.parametrize("edit, message", [
    (lambda t: t.pop("mid_block.attentions.0.add_k_proj.weight"),
     "mid_block.attentions.0.add_k_proj.weight"),
    (lambda t: t.update({"down_blocks.0.extra.weight": np.zeros(3, np.float32)}),
     "down_blocks.0.extra.weight"),
    (lambda t: t.update({"up_blocks.0.resnets.1.conv1.weight": np.zeros(
        (48, 95, 3, 3), np.float32)}), "up_blocks.0.resnets.1.conv1.weight"),
])
def test_broken_checkpoint_is_named(models, edit, message):
  _, path, config = models["decoder"]
  tensors = read_state_dict(path)
  edit(tensors)
  kwargs = karlo_unet_kwargs_from_diffusers_config(config)
  with pytest.raises(ConversionError, match=message.replace(".", r"\.")):
    convert_karlo_unet(TensorSource(tensors, path), kwargs)


@pytest.mark.parametrize("field, value", [
    ("resnet_time_scale_shift", "spatial"), ("cross_attention_norm", "group_norm"),
    ("mid_block_type", "UNetMidBlock2DCrossAttn"), ("only_cross_attention", True),
    ("down_block_types", "CrossAttnDownBlock2D"), ("class_embed_type", "timestep"),
    ("flip_sin_to_cos", False), ("new_option", 3),
])
def test_unsupported_option_is_named(models, field, value):
  config = dict(models["decoder"][2])
  config[field] = ((value,) + tuple(config[field][1:]) if field == "down_block_types"
                   else value)
  with pytest.raises(ConversionError, match=f"{field}={value!r}"):
    karlo_unet_kwargs_from_diffusers_config(config)


def test_karlo_real_configs():
  """The kwargs of Karlo's published decoder / super-resolution configs."""
  decoder = dict(DECODER, _class_name="UNet2DConditionModel", sample_size=64,
                 layers_per_block=3, block_out_channels=(320, 640, 960, 1280),
                 down_block_types=("ResnetDownsampleBlock2D",)
                 + ("SimpleCrossAttnDownBlock2D",) * 3,
                 up_block_types=("SimpleCrossAttnUpBlock2D",) * 3
                 + ("ResnetUpsampleBlock2D",),
                 cross_attention_dim=1536, attention_head_dim=64)
  del decoder["norm_num_groups"]
  assert karlo_unet_kwargs_from_diffusers_config(decoder) == dict(
      in_channels=3, out_channels=6, block_out_channels=(320, 640, 960, 1280),
      layers_per_block=(3,) * 4, down_attention=(False, True, True, True),
      up_attention=(True, True, True, False), mid_attention="cross",
      attention_head_dim=64, cross_attention_dim=1536, norm_groups=32,
      norm_eps=1e-5, scale_shift=True, time_embed_dim=1280, class_embedding=True)
  super_res = dict(_class_name="UNet2DModel", sample_size=256, layers_per_block=3,
                   down_block_types=("ResnetDownsampleBlock2D",) * 4,
                   up_block_types=("ResnetUpsampleBlock2D",) * 4,
                   block_out_channels=(320, 640, 960, 1280), in_channels=6,
                   out_channels=3, add_attention=False)
  assert karlo_unet_kwargs_from_diffusers_config(super_res) == dict(
      in_channels=6, out_channels=3, block_out_channels=(320, 640, 960, 1280),
      layers_per_block=(3,) * 4, down_attention=(False,) * 4,
      up_attention=(False,) * 4, mid_attention="none", attention_head_dim=8,
      cross_attention_dim=0, norm_groups=32, norm_eps=1e-5, scale_shift=False,
      time_embed_dim=1280, class_embedding=False)
  assert karlo_text_proj_kwargs_from_diffusers_config(
      dict(time_embed_dim=1280, cross_attention_dim=1536)) == dict(
          extra_context_tokens=4, clip_embedding_dim=768, time_embed_dim=1280,
          cross_attention_dim=1536)
