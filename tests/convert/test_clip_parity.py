"""CLIP converted from transformers and OpenAI layouts runs as the reference does.

Random tiny transformers models (seeded, every parameter perturbed so that no
LayerNorm is the identity and no bias zero) are saved as a model folder,
converted, and run by us and by torch on the same inputs: our text_features /
image_features against text_embeds, last_hidden_state and image_embeds, and our
logits against logits_per_image. The OpenAI / open_clip layout is built from
the same model with the documented correspondence (open_clip itself imports
torchvision, which cannot be installed beside CPU torch here).
"""
import jax
import flax.linen as nn
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")

# pylint: disable=wrong-import-position
from unclip_jax.convert.clip import (clip_config_from_openai_state_dict,
                                     clip_config_from_transformers,
                                     convert_openai_clip,
                                     convert_transformers_clip,
                                     load_transformers_clip)
from unclip_jax.convert.tensors import TensorSource, read_state_dict
from unclip_jax.errors import ConfigError, ConversionError
from unclip_jax.generators.clip import build_clip, init_clip_params
from unclip_jax.models.clip import (CLIP, OPENAI_IMAGE_MEAN, OPENAI_IMAGE_STD,
                                    l2_normalize_host)

BATCH, CONTEXT, VOCAB, SIDE = 3, 16, 99, 32
START, END = 97, 98  # the tokenizer's start / end ids: the two largest
LENGTHS = (CONTEXT, 6, 2)  # tokens per caption, start and end included


def _text_config(activation: str, eos_token_id: int) -> dict:
  return dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48,
              num_hidden_layers=2, num_attention_heads=2,
              max_position_embeddings=CONTEXT, hidden_act=activation,
              projection_dim=16, bos_token_id=START, eos_token_id=eos_token_id,
              pad_token_id=END)


def _perturb(model, seed: int):
  torch.manual_seed(seed)
  with torch.no_grad():
    for param in model.parameters():
      param.add_(0.1 * torch.randn_like(param))
  return model.eval()


def _tokens(pad_id: int) -> np.ndarray:
  rng = np.random.default_rng(0)
  tokens = np.full((BATCH, CONTEXT), pad_id, np.int64)
  for row, length in enumerate(LENGTHS):
    tokens[row, 0] = START
    tokens[row, 1:length - 1] = rng.integers(1, START, length - 2)
    tokens[row, length - 1] = END
  return tokens


def _images() -> np.ndarray:
  return np.random.default_rng(1).uniform(-1, 1, (BATCH, SIDE, SIDE, 3)).astype(
      np.float32)


def _pixel_values(images: np.ndarray):
  """Our [-1, 1] NHWC images as CLIPImageProcessor would give them."""
  pixels = ((images + 1) / 2 - np.asarray(OPENAI_IMAGE_MEAN, np.float32)
            ) / np.asarray(OPENAI_IMAGE_STD, np.float32)
  return torch.from_numpy(np.ascontiguousarray(pixels.transpose(0, 3, 1, 2)))


def _close(ours, reference):
  reference = np.asarray(reference, np.float32)
  scale = float(np.max(np.abs(reference)))
  np.testing.assert_allclose(np.asarray(ours), reference, rtol=1e-4,
                             atol=1e-5 * scale)


def _run(config, params, images, tokens, with_images=True):
  """Ours: (text_features, image_features, logits_per_image), jitted once."""
  model = build_clip(config)

  def forward(params, images, tokens):
    text = model.apply({"params": params}, tokens, method=CLIP.text_features)
    if not with_images:
      return text, None, None
    image = model.apply({"params": params}, images, method=CLIP.image_features)
    z_image, z_text, scale = model.apply({"params": params}, images, tokens)
    return text, image, scale * z_image @ z_text.T
  return jax.jit(forward)(params, images, tokens.astype(np.int32))


def _check_tree(config, params):
  """The converted tree has exactly the structure and shapes of init's."""
  model = build_clip(config)
  abstract = nn.unbox(jax.eval_shape(
      lambda rng: init_clip_params(model, rng, config.data.resolution,
                                   config.tokenizer.context_length),
      jax.random.key(0)))
  shapes = lambda tree: jax.tree.map(lambda x: tuple(x.shape), tree)
  assert jax.tree.structure(params) == jax.tree.structure(abstract)
  assert shapes(params) == shapes(abstract)


@pytest.fixture(scope="module", params=[("quick_gelu", 2), ("gelu", END)],
                ids=["quick_gelu-argmax", "gelu-first_end"])
def hf_clip(request, tmp_path_factory):
  """(activation, eos_token_id, torch CLIPModel, its saved folder). eos 2 is
  the legacy config that pools at the largest id; END pools at the first end
  token, and the captions are padded with it."""
  activation, eos = request.param
  config = transformers.CLIPConfig(
      text_config=_text_config(activation, eos),
      vision_config=dict(hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=2,
                         image_size=SIDE, patch_size=8, hidden_act=activation),
      projection_dim=16)
  model = _perturb(transformers.CLIPModel(config), seed=len(activation))
  folder = tmp_path_factory.mktemp(f"clip_{activation}")
  model.save_pretrained(str(folder))
  return activation, eos, model, str(folder)


def test_transformers_clip_matches(hf_clip):
  activation, eos, model, folder = hf_clip
  config, params = load_transformers_clip(folder)
  assert config.model.activation == activation
  assert config.model.text_pooling == ("argmax" if eos == 2 else "first_end")
  assert config.tokenizer.kind == "clip_bpe"
  assert config.data.resolution == SIDE
  _check_tree(config, params)

  tokens, images = _tokens(pad_id=0 if eos == 2 else END), _images()
  (pooled, encodings), image, logits = _run(config, params, images, tokens)
  with torch.no_grad():
    ids, pixels = torch.from_numpy(tokens), _pixel_values(images)
    text_out = model.text_model(input_ids=ids)
    vision_out = model.vision_model(pixel_values=pixels)
    reference = model(input_ids=ids, pixel_values=pixels)
    _close(encodings, text_out.last_hidden_state)
    _close(pooled, model.text_projection(text_out.pooler_output))
    _close(image, model.visual_projection(vision_out.pooler_output))
    _close(logits, reference.logits_per_image)
  # encode_* are the normalised features.
  np.testing.assert_allclose(
      jax.jit(lambda p, i: build_clip(config).apply(
          {"params": p}, i, method=CLIP.encode_image))(params, images),
      l2_normalize_host(image), rtol=1e-6, atol=1e-6)


def test_unscanned_conversion_has_init_structure(hf_clip):
  _, _, _, folder = hf_clip
  with open(f"{folder}/config.json") as f:
    import json  # pylint: disable=import-outside-toplevel
    config = clip_config_from_transformers(json.load(f))
  config.model.scan_layers = False
  source = TensorSource(read_state_dict(f"{folder}/model.safetensors"))
  _check_tree(config, convert_transformers_clip(source, config))


def test_text_model_alone_is_a_text_only_clip(tmp_path):
  text_config = transformers.CLIPTextConfig(**_text_config("quick_gelu", END))
  model = _perturb(transformers.CLIPTextModelWithProjection(text_config), seed=3)
  model.save_pretrained(str(tmp_path))
  config, params = load_transformers_clip(str(tmp_path))
  assert config.model.vision_depth == 0 and "vision" not in params
  _check_tree(config, params)

  tokens = _tokens(pad_id=END)
  (pooled, encodings), _, _ = _run(config, params, _images(), tokens,
                                   with_images=False)
  with torch.no_grad():
    reference = model(input_ids=torch.from_numpy(tokens))
  _close(encodings, reference.last_hidden_state)
  _close(pooled, reference.text_embeds)

  with pytest.raises(ConfigError, match="text encoder alone"):
    build_clip(config).apply({"params": params}, _images(),
                             method=CLIP.encode_image)


def _openai_state_dict(model) -> dict[str, np.ndarray]:
  """The OpenAI / open_clip names of a transformers CLIPModel's tensors."""
  hf = {k: v.detach().numpy() for k, v in model.state_dict().items()}
  out = {"attn_mask": np.zeros((CONTEXT, CONTEXT), np.float32),  # a buffer
         "logit_scale": hf["logit_scale"],
         "token_embedding.weight": hf["text_model.embeddings.token_embedding.weight"],
         "positional_embedding":
             hf["text_model.embeddings.position_embedding.weight"],
         "text_projection": hf["text_projection.weight"].T,
         "visual.conv1.weight": hf["vision_model.embeddings.patch_embedding.weight"],
         "visual.class_embedding": hf["vision_model.embeddings.class_embedding"],
         "visual.positional_embedding":
             hf["vision_model.embeddings.position_embedding.weight"],
         "visual.proj": hf["visual_projection.weight"].T}
  for ours, theirs in (("ln_final", "text_model.final_layer_norm"),
                       ("visual.ln_pre", "vision_model.pre_layrnorm"),
                       ("visual.ln_post", "vision_model.post_layernorm")):
    for part in ("weight", "bias"):
      out[f"{ours}.{part}"] = hf[f"{theirs}.{part}"]
  for ours, theirs in (("transformer", "text_model"),
                       ("visual.transformer", "vision_model")):
    for i in range(2):
      a, b = f"{ours}.resblocks.{i}.", f"{theirs}.encoder.layers.{i}."
      for part in ("weight", "bias"):
        out[f"{a}attn.in_proj_{part}"] = np.concatenate(
            [hf[f"{b}self_attn.{n}_proj.{part}"] for n in "qkv"])
        for x, y in (("attn.out_proj", "self_attn.out_proj"), ("ln_1", "layer_norm1"),
                     ("ln_2", "layer_norm2"), ("mlp.c_fc", "mlp.fc1"),
                     ("mlp.c_proj", "mlp.fc2")):
          out[f"{a}{x}.{part}"] = hf[f"{b}{y}.{part}"]
  # + attn_mask; in 4 blocks, 6 q / k / v tensors fused into 2.
  assert len(out) == len(hf) + 1 - 4 * 4
  return out


def test_openai_layout_matches(hf_clip):
  """OpenAI's text tower pools at the largest id: the end token, as the first
  end token where padding is 0."""
  activation, _, model, folder = hf_clip
  tensors = _openai_state_dict(model)
  config = clip_config_from_openai_state_dict(
      tensors, activation=activation, vision_heads=2, text_heads=2)
  hf_config, _ = load_transformers_clip(folder)
  hf_config.model.text_pooling = "argmax"
  assert config.to_dict() == hf_config.to_dict()
  params = convert_openai_clip(TensorSource(tensors, "openai"), config)
  _check_tree(config, params)

  tokens, images = _tokens(pad_id=0), _images()
  (pooled, encodings), image, logits = _run(config, params, images, tokens)
  with torch.no_grad():
    ids, pixels = torch.from_numpy(tokens), _pixel_values(images)
    text_out = model.text_model(input_ids=ids)
    _close(encodings, text_out.last_hidden_state)
    _close(pooled, model.text_projection(text_out.pooler_output))
    _close(image, model.visual_projection(
        model.vision_model(pixel_values=pixels).pooler_output))
    _close(logits, model(input_ids=ids, pixel_values=pixels).logits_per_image)


@pytest.mark.parametrize("damage,key", [
    ("extra", "text_model.encoder.layers.9.mlp.fc1.weight"),
    ("missing", "vision_model.post_layernorm.bias"),
    ("shape", "text_projection.weight"),
])
def test_damaged_checkpoint_names_the_key(hf_clip, damage, key):
  _, _, _, folder = hf_clip
  config, _ = load_transformers_clip(folder)
  tensors = read_state_dict(f"{folder}/model.safetensors")
  if damage == "extra":
    tensors[key] = np.zeros((4, 4), np.float32)
  elif damage == "missing":
    del tensors[key]
  else:
    tensors[key] = tensors[key][:, :-1]
  with pytest.raises(ConversionError, match=key.replace(".", r"\.")):
    convert_transformers_clip(TensorSource(tensors, "model.safetensors"), config)


def test_karlo_style_text_encoder_as_a_frozen_clip(tmp_path):
  """A text encoder folder and a tokenizer folder padding with the end token
  (as Karlo ships them) -> a workdir that FrozenClip reads: its tokens are
  transformers', its text_features the model's, its mask HF's attention mask."""
  from tests.convert.test_clip_tokenizer import write_clip_vocab  # pylint: disable=import-outside-toplevel
  from unclip_jax.convert.clip import convert_transformers_dir  # pylint: disable=import-outside-toplevel
  from unclip_jax.generators.clip import FrozenClip  # pylint: disable=import-outside-toplevel
  tokenizer_dir = tmp_path / "tokenizer"
  tokenizer_dir.mkdir()
  vocab, _ = write_clip_vocab(tokenizer_dir)
  (tokenizer_dir / "tokenizer_config.json").write_text(
      '{"pad_token": "<|endoftext|>"}')
  text_config = dict(_text_config("quick_gelu", 2), vocab_size=len(vocab),
                     bos_token_id=len(vocab) - 2, pad_token_id=1)
  model = _perturb(transformers.CLIPTextModelWithProjection(
      transformers.CLIPTextConfig(**text_config)), seed=5)
  model.save_pretrained(str(tmp_path / "text_encoder"))

  clip = FrozenClip(convert_transformers_dir(
      str(tmp_path / "text_encoder"), str(tmp_path / "clip"),
      tokenizer_dir=str(tokenizer_dir)))
  captions = ["A photo of a cat.", "two dogs -- what a party :)"]
  tokens = clip.tokenize(captions)
  theirs = transformers.CLIPTokenizer.from_pretrained(str(tokenizer_dir))(
      captions, padding="max_length", max_length=CONTEXT, truncation=True)
  np.testing.assert_array_equal(tokens, theirs["input_ids"])
  np.testing.assert_array_equal(clip.text_mask(tokens),
                                np.asarray(theirs["attention_mask"], bool))
  pooled, encodings = clip.text_features(tokens)
  with torch.no_grad():
    reference = model(input_ids=torch.from_numpy(tokens.astype(np.int64)))
  _close(encodings, reference.last_hidden_state)
  _close(pooled, reference.text_embeds)
  _close(clip.encode_text(tokens)[0], l2_normalize_host(reference.text_embeds))
  with pytest.raises(ConfigError, match="text encoder alone"):
    clip.encode_image(np.zeros((1, SIDE, SIDE, 3), np.float32))


def test_state_dict_file_with_another_tokenizer_leaves_nothing(hf_clip, tmp_path):
  """convert_any on an OpenAI-layout file (open_clip's "module." prefix) whose
  vocabulary is smaller than the tokenizer's: one error, no workdir."""
  from safetensors.numpy import save_file  # pylint: disable=import-outside-toplevel
  from tests.convert.test_clip_tokenizer import write_clip_vocab  # pylint: disable=import-outside-toplevel
  from unclip_jax.convert.clip import convert_any  # pylint: disable=import-outside-toplevel
  activation, eos, model, _ = hf_clip
  if eos != 2:
    pytest.skip("one model is enough")
  path = str(tmp_path / "open_clip.safetensors")
  save_file({f"module.{k}": np.array(v)
             for k, v in _openai_state_dict(model).items()}, path)
  write_clip_vocab(tmp_path)
  with pytest.raises(ConversionError, match=r"tokenizer .* has \d+ tokens, the "
                     f"model embeds {VOCAB}"):
    convert_any(path, str(tmp_path / "clip"), vocab_dir=str(tmp_path),
                activation=activation, vision_heads=2, text_heads=2)
  assert not (tmp_path / "clip").exists()
  assert not (tmp_path / "clip.partial").exists()
