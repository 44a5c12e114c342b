"""Karlo's prior in diffusers' layout (`prior/config.json`,
`prior/diffusion_pytorch_model.safetensors` of kakaobrain/karlo-v1-alpha) ->
`models.karlo_prior.KarloPrior` kwargs and params.

Karlo's prior config is diffusers' defaults (its conversion script passes
none): `KARLO_PRIOR` below. A config option the model cannot reproduce is a
ConversionError naming the field, never a model that runs other math.
"""
from typing import Any, Mapping

import numpy as np

from unclip_jax.convert.tensors import TensorSource, linear_kernel
from unclip_jax.errors import ConversionError
from unclip_jax.models.karlo_prior import NUM_EXTRA_TOKENS, TIME_ACTIVATIONS

# diffusers' PriorTransformer config fields and their defaults.
DIFFUSERS_DEFAULTS = {
    "num_attention_heads": 32,
    "attention_head_dim": 64,
    "num_layers": 20,
    "embedding_dim": 768,
    "num_embeddings": 77,
    "additional_embeddings": 4,
    "dropout": 0.0,
    "time_embed_act_fn": "silu",
    "norm_in_type": None,
    "embedding_proj_norm_type": None,
    "encoder_hid_proj_type": "linear",
    "added_emb_type": "prd",
    "time_embed_dim": None,
    "embedding_proj_dim": None,
    "clip_embed_dim": None,
}

# KarloPrior kwargs of kakaobrain/karlo-v1-alpha's prior (about 1B params).
KARLO_PRIOR = dict(embedding_dim=768, num_heads=32, head_dim=64, depth=20,
                   context_length=77, time_embed_dim=2048,
                   text_embedding_dim=768, clip_embed_dim=768,
                   time_activation="silu", norm_in=False,
                   text_embedding_norm=False)

# Buffers a state dict may hold: no weights.
_BUFFERS = ("causal_attention_mask",)


def _choice(config: Mapping, field: str, allowed: tuple) -> Any:
  value = config[field]
  if value not in allowed:
    raise ConversionError(f"prior config {field}={value!r} is not supported "
                          f"(supported: {', '.join(map(repr, allowed))})")
  return value


def karlo_prior_kwargs_from_diffusers_config(config_json: Mapping) -> dict:
  """KarloPrior kwargs (without dtype / remat / scan settings) from a
  diffusers PriorTransformer config.json dict; missing fields take
  diffusers' defaults, unknown or unsupported ones are a ConversionError."""
  class_name = config_json.get("_class_name", "PriorTransformer")
  if class_name != "PriorTransformer":
    raise ConversionError(f"prior config _class_name={class_name!r}: expected "
                          "'PriorTransformer'")
  unknown = sorted(k for k in config_json
                   if not k.startswith("_") and k not in DIFFUSERS_DEFAULTS)
  if unknown:
    raise ConversionError(f"prior config has field(s) this converter does not "
                          f"know: {', '.join(unknown)}")
  config = {**DIFFUSERS_DEFAULTS,
            **{k: v for k, v in config_json.items() if not k.startswith("_")}}
  _choice(config, "added_emb_type", ("prd",))
  _choice(config, "encoder_hid_proj_type", ("linear",))
  # The mask and the positions assume exactly the 4 tokens after the text.
  _choice(config, "additional_embeddings", (NUM_EXTRA_TOKENS,))
  norm_in = _choice(config, "norm_in_type", (None, "layer")) == "layer"
  text_norm = _choice(config, "embedding_proj_norm_type",
                      (None, "layer")) == "layer"
  activation = str(config["time_embed_act_fn"]).lower()  # as diffusers reads it
  if activation not in TIME_ACTIVATIONS:
    raise ConversionError(
        f"prior config time_embed_act_fn={config['time_embed_act_fn']!r} is "
        f"not supported (supported: {', '.join(sorted(TIME_ACTIVATIONS))})")
  # `dropout` is training-time only: the forward pass here runs without it.
  width = config["num_attention_heads"] * config["attention_head_dim"]
  embedding_dim = config["embedding_dim"]
  return dict(
      embedding_dim=embedding_dim,
      num_heads=config["num_attention_heads"],
      head_dim=config["attention_head_dim"],
      depth=config["num_layers"],
      context_length=config["num_embeddings"],
      time_embed_dim=config["time_embed_dim"] or width,
      text_embedding_dim=config["embedding_proj_dim"] or embedding_dim,
      clip_embed_dim=config["clip_embed_dim"] or embedding_dim,
      time_activation=activation,
      norm_in=norm_in,
      text_embedding_norm=text_norm)


def _dense(source: TensorSource, name: str, features_in: int,
           features_out: int) -> dict:
  return {"kernel": linear_kernel(source.take(f"{name}.weight",
                                              (features_out, features_in))),
          "bias": source.take(f"{name}.bias", (features_out,))}


def _layer_norm(source: TensorSource, name: str, width: int) -> dict:
  return {"scale": source.take(f"{name}.weight", (width,)),
          "bias": source.take(f"{name}.bias", (width,))}


def _block(source: TensorSource, width: int, num_heads: int,
           head_dim: int) -> dict:
  """One transformer_blocks.N -> transformer.py's TransformerBlock params."""
  qkv = [_dense(source, f"attn1.to_{n}", width, width) for n in "qkv"]
  out = _dense(source, "attn1.to_out.0", width, width)
  heads = (num_heads, head_dim)
  return {
      "ln_attention": _layer_norm(source, "norm1", width),
      "attention": {
          # torch's output feature h * head_dim + d is head h, channel d.
          "qkv_kernel": np.stack([p["kernel"].reshape((width,) + heads)
                                  for p in qkv], axis=1),
          "qkv_bias": np.stack([p["bias"].reshape(heads) for p in qkv]),
          "out_kernel": out["kernel"].reshape(heads + (width,)),
          "out_bias": out["bias"],
      },
      "ln_mlp": _layer_norm(source, "norm3", width),
      "mlp": {"fc_in": _dense(source, "ff.net.0.proj", width, 4 * width),
              "fc_out": _dense(source, "ff.net.2", 4 * width, width)},
  }


def convert_karlo_prior(source: TensorSource, kwargs: Mapping) -> dict:
  """diffusers PriorTransformer tensors -> KarloPrior params (plain nested
  dicts of numpy arrays), every tensor taken once (`source.finish()`).

  `kwargs` are the module's (from `karlo_prior_kwargs_from_diffusers_config`);
  with `scan_layers` (default True) the blocks are stacked on a leading
  layer axis, without it they are `blocks_0` ... as the module names them.
  """
  embedding_dim = kwargs["embedding_dim"]
  num_heads, head_dim = kwargs["num_heads"], kwargs["head_dim"]
  width = num_heads * head_dim
  text_dim = kwargs.get("text_embedding_dim") or embedding_dim
  clip_dim = kwargs.get("clip_embed_dim") or embedding_dim
  time_dim = kwargs.get("time_embed_dim") or width
  length = kwargs["context_length"] + NUM_EXTRA_TOKENS
  source.skip(_BUFFERS)
  params = {
      "time_fc_in": _dense(source, "time_embedding.linear_1", width, time_dim),
      "time_fc_out": _dense(source, "time_embedding.linear_2", time_dim, width),
      "image_embedding_in": _dense(source, "proj_in", embedding_dim, width),
      "text_embedding_in": _dense(source, "embedding_proj", text_dim, width),
      "text_encodings_in": _dense(source, "encoder_hidden_states_proj",
                                  embedding_dim, width),
      "position_embedding": source.take("positional_embedding",
                                        (1, length, width))[0],
      "query": source.take("prd_embedding", (1, 1, width))[0, 0],
      "ln_final": _layer_norm(source, "norm_out", width),
      "out": _dense(source, "proj_to_clip_embeddings", width, clip_dim),
      "clip_mean": source.take("clip_mean", (1, clip_dim))[0],
      "clip_std": source.take("clip_std", (1, clip_dim))[0],
  }
  if kwargs.get("text_embedding_norm", False):
    params["ln_text_embedding"] = _layer_norm(source, "embedding_proj_norm",
                                              text_dim)
  if kwargs.get("norm_in", False):
    params["ln_in"] = _layer_norm(source, "norm_in", width)
  blocks = [_block(source.scope(f"transformer_blocks.{i}."), width, num_heads,
                   head_dim) for i in range(kwargs["depth"])]
  if kwargs.get("scan_layers", True):
    params["transformer"] = {"blocks": _stack(blocks)}
  else:
    params["transformer"] = {f"blocks_{i}": b for i, b in enumerate(blocks)}
  source.finish()
  return params


def _stack(trees: list) -> dict:
  """Per-layer param dicts -> one dict of arrays stacked on axis 0."""
  if isinstance(trees[0], dict):
    return {k: _stack([t[k] for t in trees]) for k in trees[0]}
  return np.stack(trees)
