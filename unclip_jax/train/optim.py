"""The optimiser: AdamW with warmup + cosine decay, clipping, and a decay mask."""
import jax
import ml_collections
import optax

# Parameters that get weight decay: every weight matrix and vocabulary table,
# found by name: a path part that ends in "kernel" (nn.Dense / nn.Conv's
# `kernel` and our projections' `qkv_kernel`, `out_kernel`,
# `context_kv_kernel`, `emb_kernel`, `image_tokens_kernel`) or is a token
# table ("embedding" of nn.Embed, the decoder's "token_embedding"). By name,
# not by rank, so scanned [layers, ...] stacks of biases (2-D) stay out, and so
# do learned offsets that only look like tables: position, padding and null
# embeddings, the prior's query, CLIP's class token (docs/training.md).
DECAYED_SUFFIX = "kernel"
DECAYED_TABLES = ("embedding", "token_embedding")


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
    return any(n.endswith(DECAYED_SUFFIX) or n in DECAYED_TABLES
               for n in names if isinstance(n, str))
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
