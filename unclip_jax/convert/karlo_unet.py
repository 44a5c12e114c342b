"""Karlo's decoder, text projection and super-resolution UNets from diffusers.

`karlo_unet_kwargs_from_diffusers_config` reads a UNet2DConditionModel (the
decoder) or UNet2DModel (super_res_first / super_res_last) config.json into
`KarloUNet` kwargs, refusing, by field and value, every option whose math the
port does not have; `convert_karlo_unet` then takes each tensor of the
checkpoint exactly once. The same for UnCLIPTextProjModel (`text_proj`).
"""
from typing import Any

import numpy as np

from unclip_jax.convert.tensors import TensorSource, conv_kernel, linear_kernel
from unclip_jax.errors import ConversionError

DOWN_BLOCKS = {"ResnetDownsampleBlock2D": False, "SimpleCrossAttnDownBlock2D": True}
UP_BLOCKS = {"ResnetUpsampleBlock2D": False, "SimpleCrossAttnUpBlock2D": True}

# Options whose other values change the math (field: accepted values; the first
# is diffusers' default, used when the field is absent).
_FIXED_COMMON = {
    "center_input_sample": (False,),
    "flip_sin_to_cos": (True,),
    "freq_shift": (0,),
    "time_embedding_type": ("positional",),
    "act_fn": ("silu", "swish"),
    "mid_block_scale_factor": (1,),
    "dropout": (0.0,),  # an inference port: no dropout layers
    "num_class_embeds": (None,),
}
_FIXED_CONDITION = {
    "only_cross_attention": (False,),
    "mid_block_only_cross_attention": (None, False),
    "encoder_hid_dim": (None,),
    "encoder_hid_dim_type": (None,),
    "num_attention_heads": (None,),
    "dual_cross_attention": (False,),
    "addition_embed_type": (None,),
    "resnet_skip_time_act": (False,),
    "resnet_out_scale_factor": (1.0,),
    "time_embedding_act_fn": (None,),
    "timestep_post_act": (None,),
    "time_cond_proj_dim": (None,),
    "conv_in_kernel": (3,),
    "conv_out_kernel": (3,),
    "projection_class_embeddings_input_dim": (None,),
    "class_embeddings_concat": (False,),
    "cross_attention_norm": (None,),
    "attention_type": ("default",),
}
# Read below, or no part of the blocks Karlo uses (transformer / conv-resampling
# options of other block types, the training resolution).
_KNOWN = {
    "_class_name", "_diffusers_version", "_name_or_path", "_use_default_values",
    "sample_size", "in_channels", "out_channels", "block_out_channels",
    "layers_per_block", "down_block_types", "up_block_types", "mid_block_type",
    "attention_head_dim", "cross_attention_dim", "norm_num_groups", "norm_eps",
    "resnet_time_scale_shift", "class_embed_type", "time_embedding_dim",
    "add_attention", "attn_norm_num_groups", "downsample_padding",
    "downsample_type", "upsample_type", "num_train_timesteps",
    "use_linear_projection", "upcast_attention", "transformer_layers_per_block",
    "reverse_transformer_layers_per_block", "addition_time_embed_dim",
    "addition_embed_type_num_heads",
}


def _fail(field: str, value: Any, why: str) -> ConversionError:
  return ConversionError(f"diffusers config {field}={value!r} is not supported: {why}")


def _normal(value):
  return tuple(value) if isinstance(value, list) else value


def _uniform(config: dict, field: str, levels: int, default=None):
  """An int option given once or once per level (all equal): the int."""
  value = _normal(config.get(field, default))
  if isinstance(value, tuple):
    if len(set(value)) != 1 or len(value) != levels:
      raise _fail(field, value, "one value for every block is needed")
    value = value[0]
  return value


def _check_fixed(config: dict, fixed: dict):
  for field, accepted in fixed.items():
    value = _normal(config.get(field, accepted[0]))
    if isinstance(value, tuple) and len(set(value)) == 1:
      value = value[0]  # per-block option, the same everywhere
    if value not in accepted:
      raise _fail(field, value, f"the port implements {accepted}")
  for field, value in config.items():
    if field not in _KNOWN and field not in fixed and value not in (None, False):
      raise _fail(field, value, "an option the port does not know")


def karlo_unet_kwargs_from_diffusers_config(config_json: dict) -> dict:
  """`KarloUNet` kwargs of a diffusers UNet2DConditionModel / UNet2DModel
  config.json (as a dict); ConversionError names any option not supported."""
  config = dict(config_json)
  kind = config.get("_class_name")
  if kind not in ("UNet2DConditionModel", "UNet2DModel"):
    raise _fail("_class_name", kind, "use a UNet2DConditionModel (Karlo's decoder) "
                "or UNet2DModel (its super-resolution UNets) config")
  conditional = kind == "UNet2DConditionModel"
  _check_fixed(config, {**_FIXED_COMMON, **(_FIXED_CONDITION if conditional else {})})

  channels = tuple(config.get("block_out_channels", ()))
  levels = len(channels)
  down_types = tuple(config.get("down_block_types", ()))
  up_types = tuple(config.get("up_block_types", ()))
  if not levels or len(down_types) != levels or len(up_types) != levels:
    raise _fail("down_block_types", down_types, "one down and one up block per "
                f"entry of block_out_channels {channels}")
  allowed_down = DOWN_BLOCKS if conditional else {"ResnetDownsampleBlock2D": False}
  allowed_up = UP_BLOCKS if conditional else {"ResnetUpsampleBlock2D": False}
  for field, types, allowed in (("down_block_types", down_types, allowed_down),
                                ("up_block_types", up_types, allowed_up)):
    for block in types:
      if block not in allowed:
        raise _fail(field, block, f"the port implements {sorted(allowed)}")
  down_attention = tuple(DOWN_BLOCKS[t] for t in down_types)
  up_attention = tuple(UP_BLOCKS[t] for t in up_types)

  layers = _normal(config.get("layers_per_block", 2))
  layers = (layers,) * levels if isinstance(layers, int) else layers
  if len(layers) != levels:
    raise _fail("layers_per_block", layers, f"one per block ({levels})")
  groups = config.get("norm_num_groups", 32)
  if not isinstance(groups, int):
    raise _fail("norm_num_groups", groups, "group norms are needed")
  shift = config.get("resnet_time_scale_shift", "default")
  if shift not in ("default", "scale_shift"):
    raise _fail("resnet_time_scale_shift", shift, "use 'default' or 'scale_shift'")
  class_type = config.get("class_embed_type")
  if class_type not in (None, "identity"):
    raise _fail("class_embed_type", class_type, "use None or 'identity'")

  if conditional:
    mid = config.get("mid_block_type", "UNetMidBlock2DCrossAttn")
    if mid != "UNetMidBlock2DSimpleCrossAttn":
      raise _fail("mid_block_type", mid, "the port implements "
                  "'UNetMidBlock2DSimpleCrossAttn'")
    mid_attention = "cross"
    head_dim = _uniform(config, "attention_head_dim", levels, 8)
    cross_dim = _uniform(config, "cross_attention_dim", levels, 1280)
  else:
    mid = config.get("mid_block_type", "UNetMidBlock2D")
    if mid != "UNetMidBlock2D":
      raise _fail("mid_block_type", mid, "the port implements 'UNetMidBlock2D'")
    mid_attention = "self" if config.get("add_attention", True) else "none"
    head_dim = config.get("attention_head_dim", 8) or channels[-1]
    cross_dim = 0
    attn_groups = config.get("attn_norm_num_groups")
    if mid_attention == "self" and attn_groups not in (None, groups):
      raise _fail("attn_norm_num_groups", attn_groups, "the mid attention's group "
                  "norm must use norm_num_groups")
    if mid_attention == "self" and shift != "default" and attn_groups is None:
      raise _fail("resnet_time_scale_shift", shift, "with add_attention the mid "
                  "attention would have no group norm")
  if not isinstance(head_dim, int) or head_dim <= 0:
    raise _fail("attention_head_dim", head_dim, "one positive int is needed")
  attended = [c for c, a in zip(channels, down_attention) if a]
  attended += [c for c, a in zip(channels[::-1], up_attention) if a]
  attended += [channels[-1]] if mid_attention != "none" else []
  for width in attended:
    if width % head_dim:
      raise _fail("attention_head_dim", head_dim, f"must divide the attention "
                  f"width {width}")
  return dict(in_channels=config.get("in_channels", 3 if not conditional else 4),
              out_channels=config.get("out_channels", 3 if not conditional else 4),
              block_out_channels=channels, layers_per_block=tuple(layers),
              down_attention=down_attention, up_attention=up_attention,
              mid_attention=mid_attention, attention_head_dim=head_dim,
              cross_attention_dim=cross_dim, norm_groups=groups,
              norm_eps=float(config.get("norm_eps", 1e-5)),
              scale_shift=shift == "scale_shift",
              time_embed_dim=config.get("time_embedding_dim") or 4 * channels[0],
              class_embedding=class_type == "identity")


def karlo_text_proj_kwargs_from_diffusers_config(config_json: dict) -> dict:
  """`KarloTextProj` kwargs of an UnCLIPTextProjModel config.json."""
  config = dict(config_json)
  kind = config.get("_class_name", "UnCLIPTextProjModel")
  if kind != "UnCLIPTextProjModel":
    raise _fail("_class_name", kind, "use an UnCLIPTextProjModel config")
  for field in ("time_embed_dim", "cross_attention_dim"):
    if not isinstance(config.get(field), int):
      raise _fail(field, config.get(field), "an int is needed")
  return dict(extra_context_tokens=config.get("clip_extra_context_tokens", 4),
              clip_embedding_dim=config.get("clip_embeddings_dim", 768),
              time_embed_dim=config["time_embed_dim"],
              cross_attention_dim=config["cross_attention_dim"])


# --- tensors --------------------------------------------------------------------

def _dense(src: TensorSource, prefix: str, fan_in: int, fan_out: int) -> dict:
  return {"kernel": linear_kernel(src.take(f"{prefix}.weight", (fan_out, fan_in))),
          "bias": src.take(f"{prefix}.bias", (fan_out,))}


def _conv(src: TensorSource, prefix: str, fan_in: int, fan_out: int, size: int) -> dict:
  weight = src.take(f"{prefix}.weight", (fan_out, fan_in, size, size))
  return {"kernel": conv_kernel(weight), "bias": src.take(f"{prefix}.bias", (fan_out,))}


def _norm(src: TensorSource, prefix: str, width: int) -> dict:
  return {"scale": src.take(f"{prefix}.weight", (width,)),
          "bias": src.take(f"{prefix}.bias", (width,))}


def _resnet(src: TensorSource, prefix: str, fan_in: int, fan_out: int,
            kwargs: dict, emb_width: int) -> dict:
  parts = 2 if kwargs["scale_shift"] else 1  # torch.chunk order: scale, shift
  emb = src.take(f"{prefix}.time_emb_proj.weight", (parts * fan_out, emb_width))
  params = {
      "in_norm": _norm(src, f"{prefix}.norm1", fan_in),
      "in_conv": _conv(src, f"{prefix}.conv1", fan_in, fan_out, 3),
      "emb_kernel": np.ascontiguousarray(emb.T.reshape(emb_width, parts, fan_out)),
      "emb_bias": src.take(f"{prefix}.time_emb_proj.bias",
                           (parts * fan_out,)).reshape(parts, fan_out),
      "out_norm": _norm(src, f"{prefix}.norm2", fan_out),
      "out_conv": _conv(src, f"{prefix}.conv2", fan_out, fan_out, 3),
  }
  if fan_in != fan_out:
    params["skip"] = _conv(src, f"{prefix}.conv_shortcut", fan_in, fan_out, 1)
  return params


def _heads(src: TensorSource, prefix: str, names: tuple, fan_in: int,
           width: int, head_dim: int) -> tuple[np.ndarray, np.ndarray]:
  """Linear layers [width, fan_in] -> fused kernel [fan_in, n, heads, head_dim]
  and bias [n, heads, head_dim] (diffusers splits heads head-major)."""
  split = (width // head_dim, head_dim)
  kernels = [linear_kernel(src.take(f"{prefix}.{n}.weight", (width, fan_in)))
             .reshape(fan_in, *split) for n in names]
  biases = [src.take(f"{prefix}.{n}.bias", (width,)).reshape(split) for n in names]
  return np.stack(kernels, axis=1), np.stack(biases)


def _attention(src: TensorSource, prefix: str, width: int, kwargs: dict,
               cross: bool) -> dict:
  head_dim = kwargs["attention_head_dim"]
  qkv_kernel, qkv_bias = _heads(src, prefix, ("to_q", "to_k", "to_v"), width,
                                width, head_dim)
  params = {"norm": _norm(src, f"{prefix}.group_norm", width),
            "qkv_kernel": qkv_kernel, "qkv_bias": qkv_bias}
  if cross:
    params["context_kv_kernel"], params["context_kv_bias"] = _heads(
        src, prefix, ("add_k_proj", "add_v_proj"), kwargs["cross_attention_dim"],
        width, head_dim)
  out = linear_kernel(src.take(f"{prefix}.to_out.0.weight", (width, width)))
  params["out_kernel"] = out.reshape(width // head_dim, head_dim, width)
  params["out_bias"] = src.take(f"{prefix}.to_out.0.bias", (width,))
  return params


def convert_karlo_unet(source: TensorSource, kwargs: dict) -> dict:
  """A diffusers Karlo UNet's tensors -> `KarloUNet(**kwargs)` params."""
  channels = kwargs["block_out_channels"]
  emb_width = kwargs.get("time_embed_dim") or 4 * channels[0]
  last = len(channels) - 1
  params = {
      "conv_in": _conv(source, "conv_in", kwargs["in_channels"], channels[0], 3),
      "time_embed_0": _dense(source, "time_embedding.linear_1", channels[0], emb_width),
      "time_embed_1": _dense(source, "time_embedding.linear_2", emb_width, emb_width),
  }

  def resnet(prefix, fan_in, fan_out):
    return _resnet(source, prefix, fan_in, fan_out, kwargs, emb_width)

  skips = [channels[0]]
  width = channels[0]
  for block, out in enumerate(channels):
    for i in range(kwargs["layers_per_block"][block]):
      params[f"down_{block}_res_{i}"] = resnet(
          f"down_blocks.{block}.resnets.{i}", width, out)
      width = out
      if kwargs["down_attention"][block]:
        params[f"down_{block}_attn_{i}"] = _attention(
            source, f"down_blocks.{block}.attentions.{i}", out, kwargs, True)
      skips.append(out)
    if block != last:
      params[f"down_{block}_downsample"] = resnet(
          f"down_blocks.{block}.downsamplers.0", out, out)
      skips.append(out)

  params["mid_res_0"] = resnet("mid_block.resnets.0", width, width)
  if kwargs["mid_attention"] != "none":
    params["mid_attn"] = _attention(source, "mid_block.attentions.0", width, kwargs,
                                    kwargs["mid_attention"] == "cross")
  params["mid_res_1"] = resnet("mid_block.resnets.1", width, width)

  layers_up = list(reversed(kwargs["layers_per_block"]))
  for block, out in enumerate(reversed(channels)):
    for i in range(layers_up[block] + 1):
      params[f"up_{block}_res_{i}"] = resnet(
          f"up_blocks.{block}.resnets.{i}", width + skips.pop(), out)
      width = out
      if kwargs["up_attention"][block]:
        params[f"up_{block}_attn_{i}"] = _attention(
            source, f"up_blocks.{block}.attentions.{i}", out, kwargs, True)
    if block != last:
      params[f"up_{block}_upsample"] = resnet(
          f"up_blocks.{block}.upsamplers.0", out, out)

  params["out_norm"] = _norm(source, "conv_norm_out", channels[0])
  params["conv_out"] = _conv(source, "conv_out", channels[0],
                             kwargs["out_channels"], 3)
  source.finish()
  return params


def convert_karlo_text_proj(source: TensorSource, kwargs: dict) -> dict:
  """A diffusers UnCLIPTextProjModel's tensors -> `KarloTextProj(**kwargs)` params."""
  clip = kwargs["clip_embedding_dim"]
  extra = kwargs["extra_context_tokens"]
  cross = kwargs["cross_attention_dim"]
  time = kwargs["time_embed_dim"]
  # The Linear's outputs are [cross, extra] (channel-major): token t, channel c
  # is output c * extra + t.
  tokens = source.take("clip_extra_context_tokens_proj.weight", (extra * cross, clip))
  tokens_bias = source.take("clip_extra_context_tokens_proj.bias", (extra * cross,))
  params = {
      "null_image_embedding": source.take(
          "learned_classifier_free_guidance_embeddings", (clip,)),
      "prompt_to_time": _dense(source, "embedding_proj", clip, time),
      "image_to_time": _dense(
          source, "clip_image_embeddings_project_to_time_embeddings", clip, time),
      "image_tokens_kernel": np.ascontiguousarray(
          tokens.T.reshape(clip, cross, extra).transpose(0, 2, 1)),
      "image_tokens_bias": np.ascontiguousarray(tokens_bias.reshape(cross, extra).T),
      "text_proj": _dense(source, "encoder_hidden_states_proj", clip, cross),
      "text_norm": _norm(source, "text_encoder_hidden_states_norm", cross),
  }
  source.finish()
  return params
