"""The decoder: CLIP image embedding z_i (+ caption) -> base image (DALL-E 2 §2).

A GLIDE/ADM UNet with z_i added to the timestep embedding and projected into 4
context tokens beside the caption's own text transformer; z_i dropped 10% and the
caption 50% of the time for classifier-free guidance.

Presets: `tiny` (tests, seconds; pairs with configs/clip.py:tiny), `demo` (the CPU
demo, minutes; pairs with configs/clip.py:demo), `paper` (DALL-E 2's 3.5B 64 px
decoder, App. C).
Usage: --config configs/decoder.py:demo --config.clip_workdir=DIR
"""
import ml_collections

from configs import common


# What get_config takes (`python -m unclip_jax.train --help` lists them).
PRESETS = ("tiny", "demo", "paper")


def get_config(preset: str = "demo") -> ml_collections.ConfigDict:
  c = common.base_config("decoder")
  # The trained CLIP workdir (required) and its checkpoint step (None: the latest).
  c.clip_workdir = ml_collections.config_dict.placeholder(str)
  c.clip_step = ml_collections.config_dict.placeholder(int)

  c.model = ml_collections.ConfigDict()
  c.model.base_channels = 32
  c.model.channel_mults = (1, 2, 2)
  c.model.num_res_blocks = 2
  c.model.attention_resolutions = (8, 4)  # feature-map sides at data.resolution
  c.model.head_channels = 32
  c.model.norm_groups = 8
  c.model.dropout = 0.0
  c.model.num_image_tokens = 4  # z_i -> this many extra context tokens (§2)
  # GLIDE's caption transformer, on the CLIP tokenizer's tokens.
  c.model.text_width = 64
  c.model.text_depth = 2
  c.model.text_heads = 2
  # Caption tokens the decoder reads: the first text_context (None: CLIP's context);
  # longer than CLIP's context pads. Captions longer than it are logged at start.
  c.model.text_context = ml_collections.config_dict.placeholder(int)
  c.model.remat = "none"  # "none" | "full" | "dots" (models/remat.py)
  # Append each pixel's row and column to the UNet's input (CoordConv): not in the
  # paper; see docs/decoder.md for why the demo uses it.
  c.model.coordinate_channels = False
  # Classifier-free guidance training (§2): z_i -> learned null, caption -> empty;
  # drawn independently (the paper's rates: both dropped 5% of the time).
  c.model.image_embedding_drop_prob = 0.1
  c.model.text_drop_prob = 0.5
  # Improved DDPM's learned sigma: 6 output channels, hybrid loss with the VLB term.
  c.model.learned_variance = False
  c.model.vlb_weight = 0.001

  c.diffusion = ml_collections.ConfigDict()
  c.diffusion.schedule = "cosine"  # "cosine" | "linear"
  c.diffusion.num_timesteps = 1000
  c.diffusion.parameterization = "v"  # what the UNet predicts: "eps" | "v" | "x0"
  # Signal-to-noise ratio multiplied by this at every step (< 1: noisier;
  # diffusion/schedules.py shift_snr). 1 in the paper.
  c.diffusion.snr_shift = 1.0

  # Sampling (evaluation, and the defaults of the sampling pipeline).
  c.sample = ml_collections.ConfigDict()
  c.sample.num_steps = 50  # steps of the respaced schedule
  # "ddim" (eta), "ddpm" (variance) or "analytic" (needs the eps moments
  # training writes at its last step). docs/decoder.md.
  c.sample.sampler = "ddim"
  c.sample.guidance_scale = 3.0
  c.sample.eta = 0.0  # ddim only
  # ddpm only: "small" | "large" | "learned"; None = what the model was trained
  # for ("learned" with model.learned_variance, else "small").
  c.sample.variance = ml_collections.config_dict.placeholder(str)
  c.sample.clip_denoised = True
  # Imagen's dynamic thresholding of the predicted x0 at this percentile of
  # |x0| (e.g. 99.5) instead of clip_denoised; None: off.
  c.sample.threshold_percentile = ml_collections.config_dict.placeholder(float)
  # Analytic-DPM's E||eps_theta||^2, estimated at the last step on this many
  # held-out examples (at most eval.num_examples) at this many evenly spaced
  # original timesteps, into workdir/eps_moments.json.
  c.sample.moments_timesteps = 100
  c.sample.moments_examples = 256

  c.eval = ml_collections.ConfigDict()
  c.eval.loss_examples = 512  # held-out examples for eval/loss
  c.eval.num_examples = 64  # held-out captions sampled once each for the accuracies
  c.eval.batch_size = 32  # rows per compiled sampling / loss call
  c.eval.num_samples = 8  # rows (held-out captions) of the samples grid
  c.eval.samples_per_caption = 4  # columns of samples, then the true image
  c.cache_batch_size = 256  # images per CLIP call while building the cache

  # data.resolution is the decoder's image side; images are read at the CLIP's
  # resolution (for z_i) and resized to it. name / seed must be the CLIP's, and
  # num_emoji at most the CLIP's (the first n emoji of its subset).
  c.data.resolution = 16
  c.data.num_emoji = 16

  c.optim.lr = 2e-3
  c.optim.warmup_steps = 100
  c.optim.ema_decay = 0.999

  if preset == "tiny":
    c.total_steps = 4
    c.batch_size = 16
    c.log_every = 2
    c.eval_every = c.checkpoint_every = 4
    c.data.resolution = 8  # the tiny CLIP's 16 px, halved
    c.data.num_emoji = 8
    # One level, attention at its side: the smallest UNet with every pathway.
    c.model.update(base_channels=16, channel_mults=(1,), num_res_blocks=1,
                   attention_resolutions=(8,), head_channels=8, norm_groups=4,
                   text_width=32, text_depth=1, text_heads=2)
    c.sample.num_steps = 2
    c.sample.update(moments_timesteps=8, moments_examples=16)  # 8 calls of 16 rows
    c.eval.update(loss_examples=16, num_examples=16, batch_size=16, num_samples=4,
                  samples_per_caption=2)
    c.cache_batch_size = 64
    c.optim.warmup_steps = 1
    c.optim.ema_decay = 0.9
  elif preset == "demo":
    # 16 px base on the first 16 emoji of the CLIP demo's 256; see docs/decoder.md.
    # 800 steps, not 600: the chain's identity is decided here, and the 200
    # more took it from 94.9% to 98.5% at 16 px and from 91.9% to 94.9% at the
    # demo's 64 px (training-split prompts; docs/decoder.md, "Steps").
    c.total_steps = 800
    c.batch_size = 64
    c.log_every = 50
    c.eval_every = 800
    c.checkpoint_every = 400
    # The decoder learns placement from the caption (CLIP's z_i says far more
    # about colour and emoji than about where the emoji is), so the demo drops
    # captions 20% of the time, not the paper's 50%: 600 steps then place every
    # held-out emoji right, where 50% placed 48% after 1000 (docs/decoder.md).
    # Coordinate channels halved the steps that placement took to learn.
    c.model.update(num_res_blocks=1, text_depth=1, learned_variance=True,
                   coordinate_channels=True, text_drop_prob=0.2,
                   text_context=16)  # the demo captions are at most 15 tokens
    # Where the emoji sits is decided in the noisiest ~10% of the cosine
    # schedule's steps, so the decoder trains on it rarely and learned it in
    # 600 steps for some initial draws only; a quarter of the SNR at every step
    # doubles that share (docs/decoder.md, "Placement").
    c.diffusion.snr_shift = 0.25
    # Analytic-DPM's moments at the end of training: 20 calls of 64 rows, not
    # 100 of 256 (about a minute of the demo's 20 on two cores).
    c.sample.update(moments_timesteps=20, moments_examples=64)
  elif preset == "paper":
    # App. C, Table 3 (64 decoder) and GLIDE: 512 channels, 3 blocks, mults 1,2,3,4,
    # head width 64, attention at 32,16,8, text transformer width 2048, 24 blocks,
    # 32 heads, context 256, dropout 0.1, learned sigma, cosine 1000 steps, 250
    # sampling steps; batch 2048, 800K steps, lr 1.2e-4, Adam b2 0.999 eps 1e-8, no
    # weight decay, EMA 0.9999.
    c.total_steps = 800_000
    c.batch_size = 2048
    c.dtype = "bfloat16"
    c.log_every = 100
    c.eval_every = 10_000
    c.checkpoint_every = 5_000
    c.data.name = "laion400m"  # the CLIP's data set, prepared as array_record
    c.data.resolution = 64
    c.data.num_emoji = 0
    c.model.update(base_channels=512, channel_mults=(1, 2, 3, 4), num_res_blocks=3,
                   attention_resolutions=(32, 16, 8), head_channels=64,
                   norm_groups=32, dropout=0.1, text_width=2048, text_depth=24,
                   text_heads=32, text_context=256, remat="full",
                   learned_variance=True)
    c.diffusion.parameterization = "eps"
    # App. C: 250 strided steps of ancestral sampling with the learned variance
    # (improved DDPM), the sampler it was trained for (docs/decoder.md).
    c.sample.update(sampler="ddpm", variance="learned", num_steps=250)
    c.sample.guidance_scale = 1.25  # Table 2's decoder guidance (FID)
    c.eval.update(loss_examples=4096, num_examples=256, batch_size=64)
    c.cache_batch_size = 1024
    c.optim.lr = 1.2e-4
    c.optim.warmup_steps = 10_000
    c.optim.b2 = 0.999
    c.optim.eps = 1e-8
    c.optim.weight_decay = 0.0
    c.optim.ema_decay = 0.9999
    c.mesh.shape = (-1, 8, 1)
  else:
    raise common.unknown_preset(preset, PRESETS)
  return c
