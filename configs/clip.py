"""CLIP: a ViT image tower and a causal text tower trained contrastively.

Presets: `tiny` (tests, seconds), `demo` (the CPU demo, minutes), `paper`
(DALL-E 2's CLIP: ViT-H/16 at 256 px; causal text tower width 1024, 24 blocks).
Usage: --config configs/clip.py:demo
"""
import ml_collections

from configs import common


# What get_config takes (`python -m unclip_jax.train --help` lists them).
PRESETS = ("tiny", "demo", "paper")


def get_config(preset: str = "demo") -> ml_collections.ConfigDict:
  c = common.base_config("clip")

  c.tokenizer = ml_collections.ConfigDict()
  # "sentencepiece": ours, trained on the captions (workdir/tokenizer.model);
  # "clip_bpe": CLIP's byte-level BPE of a converted checkpoint
  # (workdir/clip_bpe.json, made from its vocab.json + merges.txt; never trained).
  c.tokenizer.kind = "sentencepiece"
  c.tokenizer.vocab_size = 1024  # upper bound; small caption sets use fewer
  c.tokenizer.context_length = 32
  # An existing tokenizer to use instead of training one: a sentencepiece
  # model, or for clip_bpe a checkpoint's tokenizer folder (vocab.json,
  # merges.txt) or a clip_bpe.json.
  c.tokenizer.model_path = ml_collections.config_dict.placeholder(str)

  c.model = ml_collections.ConfigDict()
  c.model.embed_dim = 256
  c.model.patch_size = 4
  c.model.vision_width = 192
  c.model.vision_depth = 4
  c.model.vision_heads = 3
  c.model.text_width = 128
  c.model.text_depth = 2
  c.model.text_heads = 2
  c.model.mlp_ratio = 4.0
  c.model.remat_policy = "none"  # "none" | "full" | "dots"
  c.model.scan_layers = True
  # Architecture options for converted checkpoints (unclip_jax/convert/clip.py
  # sets them); the defaults are our own CLIP.
  # MLP nonlinearity: "gelu" (exact) | "quick_gelu" (x * sigmoid(1.702 x), the
  # one OpenAI's CLIP weights were trained with).
  c.model.activation = "gelu"
  c.model.layer_norm_eps = 1e-5
  # Per-tower MLP width / model width; unset: mlp_ratio (open_clip's ViT-bigG
  # has 4.9231 in its image tower, 4 in its text tower).
  c.model.vision_mlp_ratio = ml_collections.config_dict.placeholder(float)
  c.model.text_mlp_ratio = ml_collections.config_dict.placeholder(float)
  # Which text state is pooled: "last_non_pad" (ours: the last token that is not
  # the pad id) | "first_end" (the first `end_id`: HF with a current
  # eos_token_id, where padding may be the end token) | "argmax" (the largest
  # id: OpenAI / open_clip, and HF checkpoints whose eos_token_id is 2).
  c.model.text_pooling = "last_non_pad"
  c.model.end_id = 2  # the end token of "first_end" (ours: data/tokenizer.EOS_ID)
  # False: the text stack is causal only, pad tokens read as tokens (OpenAI and
  # HF run it so; Karlo calls its text encoder without a mask).
  c.model.text_key_padding_mask = True
  # RGB mean / std of [0, 1] pixels the image tower expects (OpenAI's:
  # models/clip.py OPENAI_IMAGE_MEAN / _STD); unset: our [-1, 1] images as they
  # are. encode_image always takes [-1, 1].
  c.model.image_mean = ml_collections.config_dict.placeholder(tuple)
  c.model.image_std = ml_collections.config_dict.placeholder(tuple)
  # vision_depth = 0 is a text-only CLIP (converted from a text encoder alone):
  # no image tower, encode_image raises a ConfigError.

  c.eval = ml_collections.ConfigDict()
  c.eval.num_candidates = 256  # retrieval among this many held-out pairs
  c.eval.num_groups = 4  # groups of candidates averaged

  c.data.resolution = 32
  c.data.num_emoji = 256
  c.optim.lr = 1e-3
  c.optim.weight_decay = 0.05
  c.optim.warmup_steps = 100
  c.optim.b2 = 0.98
  c.optim.eps = 1e-6
  c.optim.ema_decay = 0.99

  if preset == "tiny":
    c.total_steps = 6
    c.batch_size = 16
    c.log_every = c.eval_every = c.checkpoint_every = 3
    c.data.resolution = 16
    c.data.num_emoji = 8
    c.tokenizer.vocab_size = 256
    c.tokenizer.context_length = 24
    c.model.update(embed_dim=32, patch_size=4, vision_width=32, vision_depth=1,
                   vision_heads=2, text_width=32, text_depth=1, text_heads=2)
    c.eval.num_candidates = 32
    c.eval.num_groups = 2
    c.optim.warmup_steps = 2
  elif preset == "demo":
    # 300 steps of 128 (3.4 epochs of 11,264 scenes) with 8 px patches (16
    # tokens): 4 px patches cost 2.5x the time per step for +0.03 i2t_top1 at
    # equal steps; docs/clip.md.
    c.total_steps = 300
    c.model.patch_size = 8
    c.batch_size = 128
    c.log_every = 25
    c.eval_every = 100
    c.checkpoint_every = 100
    c.optim.warmup_steps = 50
  elif preset == "paper":
    # App. C: ViT-H/16 at 256 px, width 1280, 32 blocks; causal text encoder
    # width 1024, 24 blocks; lr 3e-4. The paper gives a per-replica batch of
    # 64 but no global batch: 32768 is the usual CLIP batch.
    c.total_steps = 400_000
    c.batch_size = 32768
    c.dtype = "bfloat16"
    c.data.name = "laion400m"  # any TFDS image-text set prepared as array_record
    c.data.resolution = 256
    c.data.num_emoji = 0
    c.tokenizer.vocab_size = 49408
    c.tokenizer.context_length = 77
    c.model.update(embed_dim=1024, patch_size=16, vision_width=1280,
                   vision_depth=32, vision_heads=16, text_width=1024,
                   text_depth=24, text_heads=16, remat_policy="full")
    c.optim.lr = 3e-4
    c.optim.weight_decay = 0.2
    c.optim.warmup_steps = 2000
    c.optim.ema_decay = 0.9999
    c.mesh.shape = (-1, 8, 1)
  else:
    raise common.unknown_preset(preset, PRESETS)
  return c
