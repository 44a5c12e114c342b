"""Config fields every stage shares: run length, mesh, optimiser, data, logging.

A stage's config file starts from `base_config()` and fills in its model and
presets. Every field can be overridden on the command line
(`--config.optim.lr=3e-4`).
"""
import ml_collections

from unclip_jax.parallel.axes import DEFAULT_RULES


def unknown_preset(preset: str, presets: tuple[str, ...]) -> ValueError:
  """The error for a preset a config file lacks, naming the ones it has."""
  names = ", ".join(presets[:-1]) + " or " + presets[-1]
  return ValueError(f"unknown preset {preset!r}: use {names}")


def base_config(stage: str) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.stage = stage
  c.seed = 0
  c.total_steps = 1000
  c.batch_size = 64  # global, over all hosts and devices
  c.log_every = 50
  c.eval_every = 500
  c.checkpoint_every = 500
  c.keep_checkpoints = 3
  c.async_checkpointing = True
  # Stop (one-line error) after this many consecutive steps skipped for a
  # non-finite loss or gradient norm; 0 never stops. Counted from the metrics
  # fetched at log time (no extra host sync), so the run stops up to
  # log_every - 1 steps after the limit is reached.
  c.max_consecutive_skips = 20
  # Compute dtype: "bfloat16" runs matmuls, attention and convolutions in
  # bf16; params, optimizer state, norm statistics, softmax and losses stay f32.
  c.dtype = "float32"
  # Peak FLOP/s per device for perf/mfu; unset = the chip's datasheet peak, or on
  # a CPU the matmul rate measured at start-up (unclip_jax/train/peak.py).
  c.peak_flops = ml_collections.config_dict.placeholder(float)

  c.mesh = ml_collections.ConfigDict()
  c.mesh.shape = (-1, 1, 1)  # in-slice ('data', 'fsdp', 'tensor'); -1 = rest
  c.mesh.dcn_shape = (1, 1, 1)  # across slices, multiplies `shape`
  c.mesh.rules = DEFAULT_RULES  # logical axis name -> mesh axes (fallbacks)
  # With fsdp > 1, refuse to start if more of the parameter bytes than this
  # would be whole on every device (unclip_jax/parallel/coverage.py).
  c.mesh.max_replicated_fraction = 0.02

  # Multi-host (unclip_jax/parallel/distributed.py): "auto" joins a TPU pod,
  # a SLURM `srun` or an `mpirun` job when it finds one; "yes" / "no" force it.
  # A coordinator set here (all three fields) wins over the environment.
  c.distributed = ml_collections.ConfigDict()
  c.distributed.initialize = "auto"
  c.distributed.coordinator_address = ml_collections.config_dict.placeholder(str)
  c.distributed.num_processes = ml_collections.config_dict.placeholder(int)
  c.distributed.process_id = ml_collections.config_dict.placeholder(int)

  c.optim = ml_collections.ConfigDict()
  c.optim.lr = 3e-4
  c.optim.schedule = "cosine"  # "cosine" | "constant" (both after warmup)
  c.optim.warmup_steps = 100
  c.optim.end_lr_factor = 0.0  # cosine decays to lr * end_lr_factor
  c.optim.b1 = 0.9
  c.optim.b2 = 0.999
  c.optim.eps = 1e-8
  c.optim.weight_decay = 0.0  # decoupled; never on biases, norms, scalars
  c.optim.grad_clip = 1.0  # global norm; 0 disables
  c.optim.ema_decay = 0.999  # 0 disables EMA
  # Microbatches per step: the step scans over batch_size / grad_accum_steps
  # examples at a time and averages their gradients (the same update as the
  # whole batch, in less memory). CLIP contrasts within each microbatch.
  c.optim.grad_accum_steps = 1

  c.data = ml_collections.ConfigDict()
  c.data.name = "emoji_scenes"
  c.data.data_dir = ml_collections.config_dict.placeholder(str)
  c.data.resolution = 64
  c.data.num_emoji = 256
  c.data.seed = 0
  c.data.train_split = "train"
  c.data.eval_split = "test"
  c.data.image_key = "image"
  c.data.text_key = "caption"
  # Other TFDS datasets: let tfds download and prepare a missing one on first
  # use (off: a run should not start an unplanned download).
  c.data.download = False
  return c
