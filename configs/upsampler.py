"""An upsampler: a convolution-only UNet, low-res image -> high-res image.

`model.low_res` is the input side and `data.resolution` the output side; their
ratio is the upsampling factor. Trained on random crops of `model.crop_fraction`
of the output side and applied at full resolution (see docs/upsampler.md).

Presets: `tiny` (tests, seconds: 8->16), `demo` and `demo_64` (the CPU demo's
two, minutes: 16->32 and 32->64 on emoji_scenes), `paper` (DALL-E 2's 64->256
stage) and `paper_1024` (its 256->1024 stage).
Usage: --config configs/upsampler.py:demo [--config.model.low_res=16
       --config.data.resolution=64]
"""
import ml_collections

from configs import common


# What get_config takes (`python -m unclip_jax.train --help` lists them).
PRESETS = ("tiny", "demo", "demo_64", "paper", "paper_1024")


def get_config(preset: str = "demo") -> ml_collections.ConfigDict:
  c = common.base_config("upsampler")

  c.model = ml_collections.ConfigDict()
  c.model.low_res = 16  # input side; data.resolution is the output side
  c.model.base_channels = 32
  c.model.channel_mults = (1, 2)
  c.model.num_res_blocks = 1
  c.model.norm_groups = 8
  c.model.dropout = 0.0
  # Recompute block activations in the backward pass: "none" | "full" |
  # "dots" (models/remat.py). A resumed run may change it.
  c.model.remat = "none"
  # How the low-res input is made from the full image: 'blur' (gaussian blur,
  # kernel 3, sigma 0.6, then downsample: the 64->256 stage) or 'bsr' (the
  # BSR-like mix: the 256->1024 stage).
  c.model.degradation = "blur"
  # Training only: gaussian noise of a per-example std drawn from
  # [0, low_res_noise] (on the [-1, 1] scale) is added to the low-res input.
  # 0.1 cost the demo 0.7 dB of PSNR at equal steps (docs/upsampler.md).
  c.model.low_res_noise = 0.0
  # Side of the random training crops, as a fraction of data.resolution
  # (the paper's 0.25; the demo's 32 px images take 0.5: 16 px crops).
  c.model.crop_fraction = 0.5

  c.diffusion = ml_collections.ConfigDict()
  c.diffusion.schedule = "cosine"  # "cosine" | "linear"
  c.diffusion.num_timesteps = 1000
  # Signal-to-noise ratio multiplied by this at every step (< 1: noisier;
  # diffusion/schedules.py shift_snr). 1 in the paper.
  c.diffusion.snr_shift = 1.0
  # "eps" | "v" | "x0". On the demo x0 beat v by 1.7 dB of PSNR at equal
  # steps, with no speckle (docs/upsampler.md); v beat eps (the runs).
  c.diffusion.parameterization = "x0"

  # Sampling (evaluation, and the defaults of the sampling pipeline).
  c.sample = ml_collections.ConfigDict()
  c.sample.num_steps = 27  # steps of the respaced schedule
  # "ddim" (eta; the paper's, App. C), "ddpm" (variance) or "analytic" (needs
  # the eps moments training writes at its last step). docs/upsampler.md.
  c.sample.sampler = "ddim"
  c.sample.eta = 0.0  # ddim only
  # ddpm only: "small" | "large"; None = "small" (no learned variance here).
  c.sample.variance = ml_collections.config_dict.placeholder(str)
  c.sample.clip_denoised = True
  # Imagen's dynamic thresholding of the predicted x0 at this percentile of
  # |x0| (e.g. 99.5) instead of clip_denoised; None: off.
  c.sample.threshold_percentile = ml_collections.config_dict.placeholder(float)
  # Analytic-DPM's E||eps_theta||^2, estimated at the last step on this many
  # held-out images (at most eval.num_examples) at this many evenly spaced
  # original timesteps, into workdir/eps_moments.json.
  c.sample.moments_timesteps = 100
  c.sample.moments_examples = 256

  c.eval = ml_collections.ConfigDict()
  c.eval.loss_examples = 512  # held-out images for eval/loss
  c.eval.num_examples = 64  # held-out images upsampled for eval/psnr
  c.eval.batch_size = 64
  c.eval.num_samples = 8  # rows of the samples grid (the first evaluated images)

  c.data.resolution = 32
  c.data.num_emoji = 256

  c.optim.lr = 3e-3
  c.optim.warmup_steps = 50
  c.optim.ema_decay = 0.999

  if preset == "tiny":
    c.total_steps = 4
    c.batch_size = 16
    c.log_every = c.eval_every = c.checkpoint_every = 2
    c.data.resolution = 16
    c.data.num_emoji = 8
    # One level: half the compile time of two (tests compile it often).
    c.model.update(low_res=8, base_channels=16, channel_mults=(1,),
                   num_res_blocks=1, norm_groups=4)
    c.sample.num_steps = 4
    c.sample.update(moments_timesteps=8, moments_examples=16)  # 8 calls of 16 rows
    c.eval.update(loss_examples=32, num_examples=16, batch_size=16,
                  num_samples=4)
    c.optim.warmup_steps = 1
    c.optim.ema_decay = 0.9
  elif preset in ("demo", "demo_64"):
    # The demo's two: 16 -> 32 (16 px crops), then 32 -> 64 on crops a quarter
    # of the side (16 px, the paper's fraction), so both cost about the same
    # per step; on emoji_scenes, measured in docs/upsampler.md and
    # docs/demo.md. Evaluated once, at the end.
    c.total_steps = 1000
    c.batch_size = 16
    c.log_every = 100
    c.eval_every = 1000
    c.checkpoint_every = 500
    # Analytic-DPM's moments at the end: 20 calls of 64 rows, not 100 of 256.
    c.sample.update(moments_timesteps=20, moments_examples=64)
    if preset == "demo_64":
      c.data.resolution = 64
      c.model.update(low_res=32, crop_fraction=0.25)
      # Sampling 64 px images costs 4x 32 px ones: evaluate fewer.
      c.eval.update(loss_examples=128, num_examples=16, batch_size=16)
  elif preset in ("paper", "paper_1024"):
    # App. C, Table 3: 1000 diffusion steps, DDIM sampling, crops of 1/4 of
    # the target side, Adam b2 0.999 eps 1e-8, EMA 0.9999, 1M steps.
    c.total_steps = 1_000_000
    c.dtype = "bfloat16"
    c.log_every = 100
    c.eval_every = 10_000
    c.checkpoint_every = 5_000
    c.data.name = "laion400m"  # any TFDS image set prepared as array_record
    c.data.num_emoji = 0
    c.model.crop_fraction = 0.25
    c.model.low_res_noise = 0.0
    c.model.norm_groups = 32
    c.diffusion.parameterization = "eps"
    c.optim.warmup_steps = 10_000
    c.optim.ema_decay = 0.9999
    c.eval.update(loss_examples=4096, num_examples=256, batch_size=64)
    c.mesh.shape = (-1, 8, 1)
    if preset == "paper":
      # 64 -> 256: 320 channels, 3 blocks, mults 1,2,3,4 (700M), cosine,
      # blur, dropout 0.1, batch 1024, lr 1.2e-4, 27 DDIM sampling steps.
      c.batch_size = 1024
      c.data.resolution = 256
      c.model.update(low_res=64, base_channels=320, channel_mults=(1, 2, 3, 4),
                     num_res_blocks=3, dropout=0.1, degradation="blur")
      c.diffusion.schedule = "cosine"
      c.sample.num_steps = 27
      c.optim.lr = 1.2e-4
    else:
      # 256 -> 1024: 192 channels, 2 blocks, mults 1,1,2,2,4,4 (300M),
      # linear, BSR, no dropout, batch 512, lr 1.0e-4, 15 DDIM sampling steps.
      c.batch_size = 512
      c.data.resolution = 1024
      c.model.update(low_res=256, base_channels=192,
                     channel_mults=(1, 1, 2, 2, 4, 4), num_res_blocks=2,
                     dropout=0.0, degradation="bsr")
      c.diffusion.schedule = "linear"
      c.sample.num_steps = 15
      c.optim.lr = 1.0e-4
      c.eval.batch_size = 8
  else:
    raise common.unknown_preset(preset, PRESETS)
  return c
