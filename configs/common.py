"""Config fields every stage shares: run length, mesh, optimiser, data, logging.

A stage's config file starts from `base_config()` and fills in its model and
presets. Every field can be overridden on the command line
(`--config.optim.lr=3e-4`).
"""
import ml_collections

from unclip_jax.parallel.axes import DEFAULT_RULES


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
  c.dtype = "float32"  # compute dtype; params stay float32
  # Peak FLOP/s per device for perf/mfu; unset = looked up by device kind.
  c.peak_flops = ml_collections.config_dict.placeholder(float)

  c.mesh = ml_collections.ConfigDict()
  c.mesh.shape = (-1, 1, 1)  # in-slice ('data', 'fsdp', 'tensor'); -1 = rest
  c.mesh.dcn_shape = (1, 1, 1)  # across slices, multiplies `shape`
  c.mesh.rules = DEFAULT_RULES  # logical axis name -> mesh axes

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
  return c
