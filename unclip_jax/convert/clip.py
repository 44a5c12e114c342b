"""CLIP checkpoints -> our CLIP (models/clip.py): configs and params.

Two layouts of the same ViT CLIP:
- transformers: CLIPModel (`text_model.*`, `vision_model.*`, `text_projection`,
  `visual_projection`, `logit_scale`) or CLIPTextModelWithProjection alone
  (`text_model.*`, `text_projection`; a text-only CLIP, as Karlo's text_encoder/
  folder ships), described by its config.json;
- OpenAI / open_clip: one state dict (`visual.*`, `transformer.resblocks.*`,
  `token_embedding`, ...), whose sizes are read off its shapes.

q, k and v (separate Linears in transformers, one fused `in_proj` in OpenAI's)
become our fused `qkv_kernel` [width, 3, heads, head_dim]; the patch convolution
our dense patch embedding over [patch, patch, 3] pixels. Buffers (position ids,
attention masks) are skipped; every other tensor is used once, or the conversion
fails naming it. The configs come from convert/clip_config.py (re-exported here).
"""
import json
import os
from typing import Any

import jax
import ml_collections
import numpy as np

from unclip_jax.convert.clip_config import (  # pylint: disable=unused-import
    clip_config_from_openai_state_dict, clip_config_from_transformers)
from unclip_jax.convert.tensors import (TensorSource, conv_kernel, linear_kernel,
                                        read_state_dict)
from unclip_jax.convert.workdir import write_stage, written_whole
from unclip_jax.data.clip_bpe import ClipBpeTokenizer
from unclip_jax.errors import ConversionError

Params = dict[str, Any]

# Tensors of an OpenAI / open_clip state dict that hold no weights.
_OPENAI_BUFFERS = ("attn_mask", "input_resolution", "context_length", "vocab_size")
# One block's tensors, by layout: (ln_attention, ln_mlp, fc_in, fc_out, out).
_HF_BLOCK = ("layer_norm1.", "layer_norm2.", "mlp.fc1.", "mlp.fc2.",
             "self_attn.out_proj.")
_OPENAI_BLOCK = ("ln_1.", "ln_2.", "mlp.c_fc.", "mlp.c_proj.", "attn.out_proj.")


def _layer_norm(source: TensorSource, width: int) -> Params:
  return {"scale": source.take("weight", (width,)),
          "bias": source.take("bias", (width,))}


def _dense(source: TensorSource, fan_in: int, fan_out: int) -> Params:
  return {"kernel": linear_kernel(source.take("weight", (fan_out, fan_in))),
          "bias": source.take("bias", (fan_out,))}


def _block(source: TensorSource, layout, width: int, heads: int,
           mlp_dim: int) -> Params:
  """One transformer block of either layout -> our TransformerBlock params."""
  head_dim = width // heads
  ln_attention, ln_mlp, fc_in, fc_out, out = layout
  if layout is _HF_BLOCK:
    weights = [source.take(f"self_attn.{n}_proj.weight", (width, width))
               for n in "qkv"]
    biases = [source.take(f"self_attn.{n}_proj.bias", (width,)) for n in "qkv"]
  else:
    weights = source.take("attn.in_proj_weight", (3 * width, width)).reshape(
        3, width, width)
    biases = source.take("attn.in_proj_bias", (3 * width,)).reshape(3, width)
  # torch computes x @ W_n.T: our kernel[c, n, h, d] = W_n[h * head_dim + d, c].
  qkv_kernel = np.stack([w.T for w in weights], axis=1).reshape(
      width, 3, heads, head_dim)
  out_weight = source.take(out + "weight", (width, width))
  return {
      "ln_attention": _layer_norm(source.scope(ln_attention), width),
      "attention": {
          "qkv_kernel": np.ascontiguousarray(qkv_kernel),
          "qkv_bias": np.stack(biases).reshape(3, heads, head_dim),
          "out_kernel": np.ascontiguousarray(out_weight.T).reshape(
              heads, head_dim, width),
          "out_bias": source.take(out + "bias", (width,)),
      },
      "ln_mlp": _layer_norm(source.scope(ln_mlp), width),
      "mlp": {"fc_in": _dense(source.scope(fc_in), width, mlp_dim),
              "fc_out": _dense(source.scope(fc_out), mlp_dim, width)},
  }


def _stack(source: TensorSource, prefix: str, layout, depth: int, width: int,
           heads: int, mlp_ratio: float, scan_layers: bool) -> Params:
  """A TransformerStack's params: blocks stacked on a leading axis (scanned) or
  blocks_0 ... blocks_{depth-1}."""
  mlp_dim = int(width * mlp_ratio)
  blocks = [_block(source.scope(f"{prefix}{i}."), layout, width, heads, mlp_dim)
            for i in range(depth)]
  if not scan_layers:
    return {f"blocks_{i}": block for i, block in enumerate(blocks)}
  return {"blocks": jax.tree.map(lambda *leaves: np.stack(leaves), *blocks)}


def _sizes(config) -> dict:
  m = config.model
  return dict(
      embed=m.embed_dim, vocab=config.tokenizer.vocab_size,
      context=config.tokenizer.context_length, text_width=m.text_width,
      text_mlp=m.get("text_mlp_ratio") or m.mlp_ratio,
      vision_mlp=m.get("vision_mlp_ratio") or m.mlp_ratio,
      vision_width=m.vision_width, patch=m.patch_size,
      positions=(config.data.resolution // m.patch_size) ** 2 + 1,
      scan=m.scan_layers)


def _logit_scale(source: TensorSource) -> np.ndarray:
  """The log temperature: a scalar (some exports write it as [1])."""
  value = source.take("logit_scale")
  if value.size != 1:
    raise ConversionError(f"tensor 'logit_scale' of {source.origin} has shape "
                          f"{tuple(value.shape)}, the config needs ()")
  return np.asarray(value, np.float32).reshape(())


def _patch_kernel(weight: np.ndarray) -> np.ndarray:
  """Conv weight [width, 3, p, p] -> our dense kernel [p * p * 3, width]."""
  kernel = conv_kernel(weight)
  return kernel.reshape(-1, kernel.shape[-1])


def convert_transformers_clip(source: TensorSource,
                              config: ml_collections.ConfigDict) -> Params:
  """A transformers CLIPModel's tensors (or CLIPTextModelWithProjection's, for a
  text-only `config`) -> params of `build_clip(config)`, as numpy arrays.
  `config`: `clip_config_from_transformers` of its config.json."""
  m, s = config.model, _sizes(config)
  text = source.scope("text_model.")
  text.skip(["embeddings.position_ids"])
  params = {"text": {
      "token_embedding": {"embedding": text.take(
          "embeddings.token_embedding.weight", (s["vocab"], s["text_width"]))},
      "position_embedding": text.take("embeddings.position_embedding.weight",
                                      (s["context"], s["text_width"])),
      "transformer": _stack(text, "encoder.layers.", _HF_BLOCK, m.text_depth,
                            s["text_width"], m.text_heads, s["text_mlp"], s["scan"]),
      "ln_final": _layer_norm(text.scope("final_layer_norm."), s["text_width"]),
      "projection": {"kernel": linear_kernel(source.take(
          "text_projection.weight", (s["embed"], s["text_width"])))},
  }}
  if m.vision_depth > 0:
    vision, width = source.scope("vision_model."), s["vision_width"]
    vision.skip(["embeddings.position_ids"])
    params["vision"] = {
        "patch_embedding": {"kernel": _patch_kernel(vision.take(
            "embeddings.patch_embedding.weight", (width, 3, s["patch"], s["patch"])))},
        "class_token": vision.take("embeddings.class_embedding", (width,)),
        "position_embedding": vision.take("embeddings.position_embedding.weight",
                                          (s["positions"], width)),
        "ln_pre": _layer_norm(vision.scope("pre_layrnorm."), width),
        "transformer": _stack(vision, "encoder.layers.", _HF_BLOCK, m.vision_depth,
                              width, m.vision_heads, s["vision_mlp"], s["scan"]),
        "ln_post": _layer_norm(vision.scope("post_layernorm."), width),
        "projection": {"kernel": linear_kernel(source.take(
            "visual_projection.weight", (s["embed"], width)))},
    }
    params["log_logit_scale"] = _logit_scale(source)
  source.finish()
  return params


def convert_openai_clip(source: TensorSource,
                        config: ml_collections.ConfigDict) -> Params:
  """An OpenAI / open_clip ViT CLIP state dict -> params of `build_clip(config)`.
  `config`: `clip_config_from_openai_state_dict` of the same tensors."""
  m, s = config.model, _sizes(config)
  source.skip(_OPENAI_BUFFERS)
  width = s["vision_width"]
  visual = source.scope("visual.")
  params = {
      "vision": {
          "patch_embedding": {"kernel": _patch_kernel(visual.take(
              "conv1.weight", (width, 3, s["patch"], s["patch"])))},
          "class_token": visual.take("class_embedding", (width,)),
          "position_embedding": visual.take("positional_embedding",
                                            (s["positions"], width)),
          "ln_pre": _layer_norm(visual.scope("ln_pre."), width),
          "transformer": _stack(visual, "transformer.resblocks.", _OPENAI_BLOCK,
                                m.vision_depth, width, m.vision_heads,
                                s["vision_mlp"], s["scan"]),
          "ln_post": _layer_norm(visual.scope("ln_post."), width),
          "projection": {"kernel": visual.take("proj", (width, s["embed"]))},
      },
      "text": {
          "token_embedding": {"embedding": source.take(
              "token_embedding.weight", (s["vocab"], s["text_width"]))},
          "position_embedding": source.take("positional_embedding",
                                            (s["context"], s["text_width"])),
          "transformer": _stack(source, "transformer.resblocks.", _OPENAI_BLOCK,
                                m.text_depth, s["text_width"], m.text_heads,
                                s["text_mlp"], s["scan"]),
          "ln_final": _layer_norm(source.scope("ln_final."), s["text_width"]),
          "projection": {"kernel": source.take(
              "text_projection", (s["text_width"], s["embed"]))},
      },
      "log_logit_scale": _logit_scale(source),
  }
  source.finish()
  return params


def _checkpoint_tensors(directory: str) -> tuple[dict, str]:
  """A transformers model folder's tensors (model.safetensors, its shards, or
  pytorch_model.bin) and the file they came from."""
  for name in ("model.safetensors", "pytorch_model.bin"):
    path = os.path.join(directory, name)
    if os.path.exists(path):
      return read_state_dict(path), path
  index = os.path.join(directory, "model.safetensors.index.json")
  if os.path.exists(index):
    with open(index) as f:
      shards = sorted(set(json.load(f)["weight_map"].values()))
    tensors = {}
    for shard in shards:
      tensors.update(read_state_dict(os.path.join(directory, shard)))
    return tensors, index
  raise ConversionError(f"{directory} has no model.safetensors, shards of one, or "
                        "pytorch_model.bin")


def load_transformers_clip(directory: str, **config_kwargs
                           ) -> tuple[ml_collections.ConfigDict, Params]:
  """(config, params) of a transformers CLIP folder (config.json and its
  weights), e.g. Karlo's text_encoder/. `config_kwargs` go to
  `clip_config_from_transformers`."""
  path = os.path.join(directory, "config.json")
  if not os.path.exists(path):
    raise ConversionError(f"{directory} has no config.json: not a transformers "
                          "model folder")
  with open(path) as f:
    config = clip_config_from_transformers(json.load(f), **config_kwargs)
  tensors, origin = _checkpoint_tensors(directory)
  return config, convert_transformers_clip(TensorSource(tensors, origin), config)


def write_clip_workdir(out: str, config: ml_collections.ConfigDict, params: Params,
                       tokenizer_dir: str) -> str:
  """A clip workdir at `out` (new or empty): config, params as checkpoint 0, and
  the tokenizer of `tokenizer_dir` (vocab.json, merges.txt) as clip_bpe.json,
  which FrozenClip reads. Returns its path."""
  try:
    tokenizer = ClipBpeTokenizer.from_checkpoint(tokenizer_dir,
                                                 config.tokenizer.context_length)
  except (FileNotFoundError, ValueError) as e:
    raise ConversionError(f"tokenizer: {e}") from None
  if tokenizer.vocab_size > config.tokenizer.vocab_size:
    raise ConversionError(
        f"the tokenizer in {tokenizer_dir} has {tokenizer.vocab_size} tokens, the "
        f"model embeds {config.tokenizer.vocab_size}: not this model's tokenizer")
  path = write_stage(out, config, params)
  tokenizer.save(os.path.join(path, tokenizer.filename))
  return path


def convert_transformers_dir(src: str, out: str, tokenizer_dir: str | None = None,
                             **config_kwargs) -> str:
  """A transformers CLIP folder (CLIPModel, or CLIPTextModelWithProjection: a
  text-only CLIP) -> a clip workdir at `out`; the tokenizer files are read from
  `tokenizer_dir` (default: `src`). Returns the workdir's path."""
  config, params = load_transformers_clip(src, **config_kwargs)
  return write_clip_workdir(out, config, params, tokenizer_dir or src)


def _strip_module_prefix(tensors: dict) -> dict:
  """open_clip training checkpoints name every tensor "module.<name>"."""
  if tensors and all(k.startswith("module.") for k in tensors):
    return {k[len("module."):]: v for k, v in tensors.items()}
  return tensors


def convert_openai_file(src: str, out: str, vocab_dir: str,
                        **config_kwargs) -> str:
  """An OpenAI / open_clip ViT CLIP state dict file -> a clip workdir at `out`,
  with the BPE files of `vocab_dir`. `config_kwargs` go to
  `clip_config_from_openai_state_dict` (activation, vision_heads, text_heads)."""
  tensors = _strip_module_prefix(read_state_dict(src))
  config = clip_config_from_openai_state_dict(tensors, **config_kwargs)
  params = convert_openai_clip(TensorSource(tensors, src), config)
  return write_clip_workdir(out, config, params, vocab_dir)


def convert_any(src: str, out: str, vocab_dir: str | None = None,
                **config_kwargs) -> str:
  """`src` a transformers CLIP folder or an OpenAI / open_clip state dict file ->
  a clip workdir at `out`, written whole or not at all; returns its path.
  `vocab_dir`: where vocab.json and merges.txt are (default: the folder; a
  state dict file needs it). `config_kwargs`: `activation` and the head counts
  of a state dict (see `clip_config_from_openai_state_dict`); a folder's
  config.json gives them, so they are not read for a folder."""
  if not os.path.exists(src):
    raise ConversionError(f"{src} does not exist")
  with written_whole(out) as partial:
    if os.path.isdir(src):
      convert_transformers_dir(src, partial, vocab_dir)
    else:
      if not vocab_dir:
        raise ConversionError(f"{src} is a state dict file: pass the folder with "
                              "its vocab.json and merges.txt (--vocab_dir)")
      convert_openai_file(src, partial, vocab_dir, **config_kwargs)
  return os.path.abspath(out)
