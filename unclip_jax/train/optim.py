"""The optimiser: AdamW with warmup + cosine decay, clipping, and a decay mask."""
import jax
import ml_collections
import optax

# Parameters that get weight decay: those with a path part named exactly
# "kernel" or "embedding" (nn.Dense / nn.Conv kernels, nn.Embed tables). By
# name, not by rank, so scanned [layers, ...] stacks of biases (2-D) stay out;
# so do params declared under names of their own, such as the attention
# projections' qkv_kernel / out_kernel / context_kv_kernel, the UNet's
# emb_kernel and image_tokens_kernel (docs/training.md lists them).
DECAYED_NAMES = ("kernel", "embedding")


def learning_rate_schedule(optim: ml_collections.ConfigDict,
                           total_steps: int) -> optax.Schedule:
  warmup = min(optim.warmup_steps, max(total_steps - 1, 0))
  if optim.schedule == "cosine":
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=optim.lr, warmup_steps=warmup,
        decay_steps=max(total_steps, warmup + 1),
        end_value=optim.lr * optim.end_lr_factor)
  if optim.schedule == "constant":
    return optax.join_schedules(
        [optax.linear_schedule(0.0, optim.lr, max(warmup, 1)),
         optax.constant_schedule(optim.lr)], [warmup])
  raise ValueError(f"optim.schedule={optim.schedule!r}: use 'cosine' or "
                   "'constant'")


def decay_mask(params):
  def decayed(path, _):
    names = [getattr(k, "key", None) for k in path]
    return any(n in DECAYED_NAMES for n in names if isinstance(n, str))
  return jax.tree_util.tree_map_with_path(decayed, params)


def make_optimizer(optim: ml_collections.ConfigDict,
                   total_steps: int) -> optax.GradientTransformation:
  schedule = learning_rate_schedule(optim, total_steps)
  parts = []
  if optim.grad_clip:
    parts.append(optax.clip_by_global_norm(optim.grad_clip))
  parts.append(optax.adamw(schedule, b1=optim.b1, b2=optim.b2, eps=optim.eps,
                           weight_decay=optim.weight_decay, mask=decay_mask))
  return optax.chain(*parts)
