"""The diffusion prior: caption (frozen CLIP text outputs) -> CLIP image embedding.

Presets: `tiny` (tests, seconds; pairs with configs/clip.py:tiny), `demo` (the CPU demo,
minutes; pairs with configs/clip.py:demo), `paper` (DALL-E 2's diffusion prior, App. C:
width 2048, 24 blocks, 32 heads, about 1B parameters).
Usage: --config configs/prior.py:demo --config.clip_workdir=DIR
"""
import ml_collections

from configs import common


# What get_config takes (`python -m unclip_jax.train --help` lists them).
PRESETS = ("tiny", "demo", "paper")


def get_config(preset: str = "demo") -> ml_collections.ConfigDict:
  c = common.base_config("prior")
  # The trained CLIP workdir (required) and its checkpoint step (None: the latest).
  c.clip_workdir = ml_collections.config_dict.placeholder(str)
  c.clip_step = ml_collections.config_dict.placeholder(int)

  c.model = ml_collections.ConfigDict()
  c.model.width = 256
  c.model.depth = 4
  c.model.num_heads = 4
  c.model.mlp_ratio = 4.0
  c.model.dropout = 0.0
  c.model.remat_policy = "none"  # "none" | "full" | "dots"
  c.model.scan_layers = True
  # How CLIP image embeddings (unit vectors) are scaled before diffusion:
  # "standardize" (per-dimension mean / std of the training cache), "sqrt_dim"
  # (x sqrt(embed_dim): unit variance per dimension on average) or a number
  # ("17.2", the paper's). See docs/prior.md.
  c.model.embedding_scale = "standardize"
  c.model.text_drop_prob = 0.1  # caption replaced by the learned null (for guidance)
  # Token encodings the prior reads: the first text_context (None: all of CLIP's
  # context). Shorter is faster; captions longer than it are logged at start.
  c.model.text_context = ml_collections.config_dict.placeholder(int)

  c.diffusion = ml_collections.ConfigDict()
  c.diffusion.schedule = "cosine"
  c.diffusion.num_timesteps = 1000
  c.diffusion.parameterization = "x0"  # §2.1: the prior predicts z_i itself
  # Signal-to-noise ratio multiplied by this at every step (< 1: noisier;
  # diffusion/schedules.py shift_snr). 1 in the paper.
  c.diffusion.snr_shift = 1.0

  # Sampling (evaluation, and the defaults of the sampling pipeline).
  c.sample = ml_collections.ConfigDict()
  c.sample.num_steps = 64  # steps of the respaced schedule
  # "ddim" (eta), "ddpm" (variance) or "analytic" (Analytic-DPM, the paper's:
  # needs the eps moments training writes at its last step). docs/prior.md.
  c.sample.sampler = "ddim"
  c.sample.guidance_scale = 1.0  # §5: guiding the prior hurt; only the decoder is guided
  c.sample.num_candidates = 2  # keep the candidate with the highest z_i . z_t
  c.sample.eta = 0.0  # ddim only
  # ddpm only: "small" | "large"; None = "small" (the prior learns no variance).
  c.sample.variance = ml_collections.config_dict.placeholder(str)
  # Analytic-DPM's E||eps_theta||^2, estimated at the last step on this many
  # held-out examples at this many evenly spaced original timesteps (any
  # respacing interpolates between them), into workdir/eps_moments.json.
  c.sample.moments_timesteps = 100
  c.sample.moments_examples = 256

  c.eval = ml_collections.ConfigDict()
  c.eval.num_examples = 256  # held-out captions sampled; also the retrieval gallery
  c.eval.loss_examples = 1024  # held-out examples for eval/loss
  c.eval.batch_size = 256
  c.cache_batch_size = 256  # images per CLIP call while building the cache

  # Must match the CLIP's data (its resolution and emoji subset).
  c.data.resolution = 32
  c.data.num_emoji = 256

  c.optim.lr = 1e-3
  c.optim.warmup_steps = 100
  c.optim.b2 = 0.96
  c.optim.eps = 1e-6
  c.optim.weight_decay = 0.06
  c.optim.ema_decay = 0.999

  if preset == "tiny":
    c.total_steps = 4
    c.batch_size = 16
    c.log_every = c.eval_every = c.checkpoint_every = 2
    c.data.resolution = 16
    c.data.num_emoji = 8
    c.model.update(width=32, depth=1, num_heads=2)
    c.sample.num_steps = 4
    c.sample.update(moments_timesteps=8, moments_examples=16)  # 8 calls of 16 rows
    c.eval.update(num_examples=32, loss_examples=32, batch_size=32)
    c.cache_batch_size = 64
    c.optim.warmup_steps = 1
    c.optim.ema_decay = 0.9
  elif preset == "demo":
    c.total_steps = 600
    c.batch_size = 128
    c.log_every = 50
    c.eval_every = 300
    c.checkpoint_every = 300
    c.model.update(width=128, depth=2, num_heads=4, text_context=16)
  elif preset == "paper":
    # App. C, Table 3 (diffusion prior): 1000 cosine steps, 64 sampling steps,
    # width 2048, 24 blocks, 32 heads; AdamW lr 1.1e-4, b2 0.96, eps 1e-6, weight
    # decay 6e-2, EMA 0.9999, batch 4096, 600K steps; inputs scaled by 17.2.
    c.total_steps = 600_000
    c.batch_size = 4096
    c.dtype = "bfloat16"
    c.log_every = 100
    c.eval_every = 10_000
    c.checkpoint_every = 5_000
    c.data.name = "laion400m"  # the CLIP's data set, prepared as array_record
    c.data.resolution = 256
    c.data.num_emoji = 0
    c.model.update(width=2048, depth=24, num_heads=32, remat_policy="full",
                   embedding_scale="17.2")
    # App. C: 64 strided steps with Analytic-DPM's variance (docs/prior.md).
    c.sample.update(sampler="analytic", num_steps=64)
    c.eval.update(num_examples=256, loss_examples=4096, batch_size=1024)
    c.cache_batch_size = 1024
    c.optim.lr = 1.1e-4
    c.optim.warmup_steps = 10_000
    c.optim.weight_decay = 6e-2
    c.optim.ema_decay = 0.9999
    c.mesh.shape = (-1, 8, 1)
  else:
    raise common.unknown_preset(preset, PRESETS)
  return c
