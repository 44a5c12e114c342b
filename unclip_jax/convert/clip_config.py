"""The clip stage config of a CLIP checkpoint: from a transformers config.json,
or read off the shapes of an OpenAI / open_clip state dict (as OpenAI's
build_model does). convert/clip.py converts the params to it."""
import re

import ml_collections

from configs import clip as clip_configs
from unclip_jax.errors import ConversionError
from unclip_jax.models.clip import OPENAI_IMAGE_MEAN, OPENAI_IMAGE_STD
from unclip_jax.models.transformer import ACTIVATIONS

# transformers' CLIPTextConfig / CLIPVisionConfig defaults: a config.json leaves
# out the fields that have them.
_HF_TEXT_DEFAULTS = dict(vocab_size=49408, hidden_size=512, intermediate_size=2048,
                         projection_dim=512, num_hidden_layers=12,
                         num_attention_heads=8, max_position_embeddings=77,
                         hidden_act="quick_gelu", layer_norm_eps=1e-5,
                         eos_token_id=49407)
_HF_VISION_DEFAULTS = dict(hidden_size=768, intermediate_size=3072,
                           num_hidden_layers=12, num_attention_heads=12,
                           num_channels=3, image_size=224, patch_size=32,
                           hidden_act="quick_gelu", layer_norm_eps=1e-5)


def _mlp_ratio(width: int, hidden: int) -> float:
  """A ratio r with int(width * r) == hidden (how our blocks size the MLP)."""
  ratio = hidden / width
  return ratio if int(width * ratio) == hidden else (hidden + 0.5) / width


def _activation(name: str, where: str) -> str:
  if name not in ACTIVATIONS:
    raise ConversionError(f"{where} uses the activation {name!r}; CLIP converts "
                          f"with one of {', '.join(ACTIVATIONS)}")
  return name


def _base_config(preset: str) -> ml_collections.ConfigDict:
  config = clip_configs.get_config(preset)
  config.dtype = "float32"
  config.tokenizer.kind = "clip_bpe"
  config.model.remat_policy = "none"
  config.model.text_key_padding_mask = False
  return config


def _set_image_stats(config, image_mean, image_std) -> None:
  config.model.image_mean = None if image_mean is None else tuple(image_mean)
  config.model.image_std = None if image_std is None else tuple(image_std)


def clip_config_from_transformers(
    config_json: dict, *, preset: str = "demo",
    image_mean=OPENAI_IMAGE_MEAN, image_std=OPENAI_IMAGE_STD
) -> ml_collections.ConfigDict:
  """The clip stage config (configs/clip.py `preset`, float32) of a transformers
  CLIPModel or CLIPTextModelWithProjection `config.json` (as a dict).

  A text model alone gives a text-only CLIP (model.vision_depth = 0). The text
  tower pools at the first `eos_token_id`, or, for the configs that still say 2
  (OpenAI's conversions), at the largest token id, as transformers does.
  `image_mean` / `image_std`: the pixel statistics of the checkpoint's
  preprocessor_config.json (OpenAI's by default).
  """
  model_type = config_json.get("model_type", "clip")
  if model_type == "clip":
    text = {**_HF_TEXT_DEFAULTS, **(config_json.get("text_config") or {})}
    vision = {**_HF_VISION_DEFAULTS, **(config_json.get("vision_config") or {})}
    projection_dim = config_json.get("projection_dim", 512)
  elif model_type == "clip_text_model":
    text = {**_HF_TEXT_DEFAULTS, **config_json}
    vision, projection_dim = None, text["projection_dim"]
  else:
    raise ConversionError(f"config.json has model_type {model_type!r}; CLIP converts "
                          "'clip' (CLIPModel) or 'clip_text_model' "
                          "(CLIPTextModelWithProjection)")
  config = _base_config(preset)
  m = config.model
  m.embed_dim = projection_dim
  m.text_width = text["hidden_size"]
  m.text_depth = text["num_hidden_layers"]
  m.text_heads = text["num_attention_heads"]
  m.text_mlp_ratio = _mlp_ratio(m.text_width, text["intermediate_size"])
  m.activation = _activation(text["hidden_act"], "the text tower")
  m.layer_norm_eps = float(text["layer_norm_eps"])
  eos = text["eos_token_id"]
  if isinstance(eos, (list, tuple)):
    eos = eos[0]
  m.text_pooling = "argmax" if eos == 2 else "first_end"
  m.end_id = text["vocab_size"] - 1 if eos == 2 else eos
  config.tokenizer.vocab_size = text["vocab_size"]
  config.tokenizer.context_length = text["max_position_embeddings"]
  if vision is None:
    m.vision_depth = 0
    _set_image_stats(config, None, None)
    return config
  if vision["num_channels"] != 3:
    raise ConversionError(f"the image tower reads {vision['num_channels']} "
                          "channels; CLIP converts RGB (3)")
  for field in ("hidden_act", "layer_norm_eps"):
    if vision[field] != text[field]:
      raise ConversionError(f"the towers differ in {field} ({vision[field]!r} vs "
                            f"{text[field]!r}); our CLIP has one for both")
  m.vision_width = vision["hidden_size"]
  m.vision_depth = vision["num_hidden_layers"]
  m.vision_heads = vision["num_attention_heads"]
  m.vision_mlp_ratio = _mlp_ratio(m.vision_width, vision["intermediate_size"])
  m.patch_size = vision["patch_size"]
  config.data.resolution = vision["image_size"]
  _set_image_stats(config, image_mean, image_std)
  return config


def _count_blocks(tensors, prefix: str) -> int:
  pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
  found = {int(m.group(1)) for k in tensors if (m := pattern.match(k))}
  return max(found) + 1 if found else 0


def clip_config_from_openai_state_dict(
    tensors, *, activation: str = "quick_gelu", vision_heads: int | None = None,
    text_heads: int | None = None, preset: str = "demo",
    image_mean=OPENAI_IMAGE_MEAN, image_std=OPENAI_IMAGE_STD
) -> ml_collections.ConfigDict:
  """The clip stage config of an OpenAI or open_clip ViT CLIP state dict
  (name -> array), its sizes read off the shapes as OpenAI's build_model does.

  `activation`: "quick_gelu" for OpenAI's weights (and open_clip's `-quickgelu`
  models and OpenAI-pretrained ones); open_clip's other ViT models (LAION
  trained ViT-H/14, ViT-bigG/14, ...) use plain GELU: pass "gelu".
  `vision_heads` / `text_heads`: by default width // 64 (OpenAI's rule); open_clip
  models with another head width need them, e.g. ViT-H/14: vision_heads=16.
  """
  if "visual.conv1.weight" not in tensors:
    raise ConversionError("the state dict has no 'visual.conv1.weight': not a ViT "
                          "CLIP (ResNet image towers are not supported)")
  conv = tensors["visual.conv1.weight"]
  vision_width, patch = conv.shape[0], conv.shape[-1]
  positions = tensors["visual.positional_embedding"].shape[0]
  grid = int(round((positions - 1) ** 0.5))
  if grid * grid + 1 != positions:
    raise ConversionError(f"'visual.positional_embedding' has {positions} rows, "
                          "not a square grid of patches and a class token")
  text_width = tensors["ln_final.weight"].shape[0]
  config = _base_config(preset)
  m = config.model
  m.embed_dim = tensors["text_projection"].shape[1]
  m.vision_width = vision_width
  m.vision_depth = _count_blocks(tensors, "visual.transformer.resblocks.")
  m.vision_heads = vision_heads or vision_width // 64
  m.vision_mlp_ratio = _mlp_ratio(
      vision_width, tensors["visual.transformer.resblocks.0.mlp.c_fc.weight"].shape[0])
  m.patch_size = patch
  m.text_width = text_width
  m.text_depth = _count_blocks(tensors, "transformer.resblocks.")
  m.text_heads = text_heads or text_width // 64
  m.text_mlp_ratio = _mlp_ratio(
      text_width, tensors["transformer.resblocks.0.mlp.c_fc.weight"].shape[0])
  m.activation = _activation(activation, "activation")
  m.layer_norm_eps = 1e-5
  # OpenAI's text tower pools at the largest id, its end token (the last one).
  vocab = tensors["token_embedding.weight"].shape[0]
  m.text_pooling, m.end_id = "argmax", vocab - 1
  config.tokenizer.vocab_size = vocab
  config.tokenizer.context_length = tensors["positional_embedding"].shape[0]
  config.data.resolution = patch * grid
  _set_image_stats(config, image_mean, image_std)
  return config
