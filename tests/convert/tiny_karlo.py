"""A tiny random Karlo in diffusers' layout, built locally (nothing downloaded):
the published architecture's block types and options at widths of 8-64, every
parameter perturbed (diffusers zero-initialises output layers, which would hide
conversion mistakes), saved with `save_pretrained` as safetensors."""
import json
import os

# CLIP's vocabulary in miniature: every byte as a symbol, alone and word-final,
# merges that build a few whole words, then the two special tokens.
WORDS = ("red", "apple", "a", "photo", "of", "the", "sea", "blue", "cat")


def bytes_to_unicode() -> dict[int, str]:
  """Byte-level BPE's printable stand-in for each byte (GPT-2 / CLIP)."""
  printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
               + list(range(ord("®"), ord("ÿ") + 1)))
  codes, extra = printable[:], 0
  for byte in range(256):
    if byte not in printable:
      printable.append(byte)
      codes.append(256 + extra)
      extra += 1
  return dict(zip(printable, map(chr, codes)))


def write_clip_vocab(directory: str, words=WORDS) -> str:
  """vocab.json + merges.txt of a CLIP-style BPE that merges `words` letter by
  letter from the left; returns `directory`."""
  symbols = list(bytes_to_unicode().values())
  vocab = symbols + [s + "</w>" for s in symbols]
  merges = []
  for word in words:
    pieces = list(word[:-1]) + [word[-1] + "</w>"]
    while len(pieces) > 1:
      merge = (pieces[0], pieces[1])
      if " ".join(merge) not in merges:
        merges.append(" ".join(merge))
        vocab.append("".join(merge))
      pieces = ["".join(merge)] + pieces[2:]
  vocab += ["<|startoftext|>", "<|endoftext|>"]
  os.makedirs(directory, exist_ok=True)
  with open(os.path.join(directory, "vocab.json"), "w", encoding="utf-8") as f:
    json.dump({token: i for i, token in enumerate(vocab)}, f, ensure_ascii=False)
  with open(os.path.join(directory, "merges.txt"), "w", encoding="utf-8") as f:
    f.write("#version: 0.2\n" + "\n".join(merges) + "\n")
  return directory


def build_karlo(directory: str, *, seed: int = 0, decoder_side: int = 16,
                super_res_side: int = 32):
  """A random UnCLIPPipeline saved in `directory`; returns the pipeline."""
  import torch
  from diffusers import (PriorTransformer, UnCLIPPipeline, UnCLIPScheduler,
                         UNet2DConditionModel, UNet2DModel)
  from diffusers.pipelines.deprecated.unclip.text_proj import UnCLIPTextProjModel
  from transformers import (CLIPTextConfig, CLIPTextModelWithProjection,
                            CLIPTokenizer)

  vocab_dir = write_clip_vocab(os.path.join(directory + "_vocab"))
  tokenizer = CLIPTokenizer(os.path.join(vocab_dir, "vocab.json"),
                            os.path.join(vocab_dir, "merges.txt"),
                            model_max_length=77)
  torch.manual_seed(seed)
  width, cross, time = 32, 32, 64
  text_encoder = CLIPTextModelWithProjection(CLIPTextConfig(
      vocab_size=len(tokenizer), hidden_size=width, intermediate_size=48,
      projection_dim=width, num_hidden_layers=2, num_attention_heads=4,
      max_position_embeddings=77, hidden_act="quick_gelu",
      bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
      pad_token_id=tokenizer.pad_token_id))
  prior = PriorTransformer(num_attention_heads=2, attention_head_dim=8,
                           num_layers=2, embedding_dim=width, num_embeddings=77)
  text_proj = UnCLIPTextProjModel(clip_embeddings_dim=width, time_embed_dim=time,
                                  cross_attention_dim=cross)
  decoder = UNet2DConditionModel(
      sample_size=decoder_side, in_channels=3, out_channels=6, layers_per_block=1,
      down_block_types=("ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"),
      up_block_types=("SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"),
      mid_block_type="UNetMidBlock2DSimpleCrossAttn", block_out_channels=(16, 32),
      norm_num_groups=8, cross_attention_dim=cross, class_embed_type="identity",
      attention_head_dim=8, resnet_time_scale_shift="scale_shift")
  super_res = dict(
      sample_size=super_res_side, layers_per_block=1, in_channels=6, out_channels=3,
      down_block_types=("ResnetDownsampleBlock2D",) * 2,
      up_block_types=("ResnetUpsampleBlock2D",) * 2, block_out_channels=(16, 32),
      norm_num_groups=8, add_attention=False)  # Karlo: the default time shift
  models = [text_encoder, prior, text_proj, decoder, UNet2DModel(**super_res),
            UNet2DModel(**super_res)]
  generator = torch.Generator().manual_seed(seed + 1)
  with torch.no_grad():
    for model in models:
      for p in model.parameters():
        p.add_(0.05 * torch.randn(p.shape, generator=generator))
      model.eval()
    prior.clip_std.abs_().add_(0.5)  # a standard deviation
  pipe = UnCLIPPipeline(
      prior=prior, decoder=decoder, text_proj=text_proj, text_encoder=text_encoder,
      tokenizer=tokenizer, super_res_first=models[4], super_res_last=models[5],
      prior_scheduler=UnCLIPScheduler(variance_type="fixed_small_log",
                                      prediction_type="sample", clip_sample_range=5.0),
      decoder_scheduler=UnCLIPScheduler(variance_type="learned_range"),
      super_res_scheduler=UnCLIPScheduler(variance_type="fixed_small_log"))
  pipe.save_pretrained(directory, safe_serialization=True)
  return pipe
