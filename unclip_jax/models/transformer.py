"""Pre-LayerNorm transformer blocks, a scanned stack of them, and LayerNorm.

Shared by the CLIP towers (vit.py, text.py), the diffusion prior (prior.py)
and the UNet's caption encoder (unet_blocks.py); attention is attention.py's.
Every parameter carries logical axis names (unclip_jax.parallel.axes); the
stack runs its blocks under `nn.scan` so that compile time does not grow with
depth, with the block parameters stacked on a leading LAYERS axis.
"""
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from unclip_jax.models import attention
from unclip_jax.models import remat as remat_lib
from unclip_jax.models.precision import dot_general_f32_accumulate
from unclip_jax.parallel.axes import (ACT_BATCH, ACT_EMBED, ACT_LENGTH,
                                      ACT_MLP, EMBED, LAYERS, MLP, NORM)

Dtype = Any

REMAT_POLICIES = remat_lib.REMAT_POLICIES

dense_init = nn.initializers.xavier_uniform()
zeros = nn.initializers.zeros
ones = nn.initializers.ones


def constrain_tokens(x: jnp.ndarray) -> jnp.ndarray:
  """Sharding constraint for a [batch, length, width] activation."""
  return nn.with_logical_constraint(x, (ACT_BATCH, ACT_LENGTH, ACT_EMBED))


def layer_norm(dtype: Dtype, name: str) -> nn.LayerNorm:
  """The LayerNorm of every model: named scale / bias, output in `dtype`
  (flax computes the statistics in float32)."""
  return nn.LayerNorm(
      epsilon=1e-5, dtype=dtype, name=name,
      scale_init=nn.with_logical_partitioning(ones, (NORM,)),
      bias_init=nn.with_logical_partitioning(zeros, (NORM,)))


def causal_mask(length: int) -> jnp.ndarray:
  """[1, 1, length, length] bool: query i may attend to keys j <= i."""
  return jnp.tril(jnp.ones((length, length), jnp.bool_))[None, None]


def make_attention_mask(key_padding_mask: jnp.ndarray | None = None,
                        causal: bool = False,
                        length: int | None = None) -> jnp.ndarray | None:
  """Attention mask [batch | 1, 1, length, length] from a causal flag and a
  key padding mask.

  Args:
    key_padding_mask: [batch, length] bool, True where a key is a real token.
    causal: also hide later keys from each query.
    length: the sequence length (needed only without `key_padding_mask`).

  Returns:
    The bool mask (True = may attend), or None when nothing is masked. Every
    query may always attend to itself: a padded query then never has an empty
    row (no NaNs, no attention to the future), and since padded keys stay hidden
    from every other query this changes no output at a real position.
  """
  if key_padding_mask is None and not causal:
    return None
  if key_padding_mask is not None:
    length = key_padding_mask.shape[-1]
  mask = jnp.ones((1, 1, length, length), jnp.bool_)
  if causal:
    mask = causal_mask(length)
  if key_padding_mask is not None:
    mask = mask & key_padding_mask[:, None, None, :].astype(jnp.bool_)
  return mask | jnp.eye(length, dtype=jnp.bool_)[None, None]


class MultiHeadAttention(nn.Module):
  """Multi-head self-attention (attention.py); logits and softmax in float32.

  Params: `qkv_kernel` [width, 3, heads, head_dim], `qkv_bias`, `out_kernel`
  [heads, head_dim, width], `out_bias`.
  """
  num_heads: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray, mask: jnp.ndarray | None) -> jnp.ndarray:
    """x: [batch, length, width]; mask: bool, broadcastable to
    [batch, heads, length, length]."""
    width = x.shape[-1]
    if width % self.num_heads:
      raise ValueError(f"width {width} is not divisible by num_heads "
                       f"{self.num_heads}")
    query, key, value = attention.project_heads(
        self, x, num_outputs=3, num_heads=self.num_heads,
        head_dim=width // self.num_heads, dtype=self.dtype, name="qkv")
    attended = nn.with_logical_constraint(
        attention.dot_product_attention(query, key, value, mask),
        attention.HEAD_AXES)
    return attention.merge_heads(self, attended, features=width,
                                 dtype=self.dtype, name="out")


class MlpBlock(nn.Module):
  """Two-layer GELU feed-forward block."""
  hidden_dim: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    width = x.shape[-1]
    hidden = nn.Dense(
        self.hidden_dim, dtype=self.dtype, name="fc_in",
        dot_general=dot_general_f32_accumulate,
        kernel_init=nn.with_logical_partitioning(dense_init, (EMBED, MLP)),
        bias_init=nn.with_logical_partitioning(zeros, (MLP,)))(x)
    hidden = nn.with_logical_constraint(hidden,
                                        (ACT_BATCH, ACT_LENGTH, ACT_MLP))
    hidden = nn.gelu(hidden, approximate=False)
    return nn.Dense(
        width, dtype=self.dtype, name="fc_out",
        dot_general=dot_general_f32_accumulate,
        kernel_init=nn.with_logical_partitioning(dense_init, (MLP, EMBED)),
        bias_init=nn.with_logical_partitioning(zeros, (EMBED,)))(hidden)


class TransformerBlock(nn.Module):
  """x + Attn(LN(x)), then x + MLP(LN(x)); dropout on both residual branches."""
  num_heads: int
  mlp_ratio: float = 4.0
  dropout: float = 0.0
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray, mask: jnp.ndarray | None,
               deterministic: bool) -> jnp.ndarray:
    x = constrain_tokens(x)
    y = layer_norm(self.dtype, "ln_attention")(x)
    y = MultiHeadAttention(self.num_heads, dtype=self.dtype,
                           name="attention")(y, mask)
    y = nn.Dropout(self.dropout)(y, deterministic=deterministic)
    # Sums stay in the compute dtype: the f32-accumulated branches would
    # otherwise promote the residual stream (and break scan's carry type).
    x = constrain_tokens((x + y).astype(self.dtype))
    y = layer_norm(self.dtype, "ln_mlp")(x)
    y = MlpBlock(int(x.shape[-1] * self.mlp_ratio), dtype=self.dtype,
                 name="mlp")(y)
    y = nn.Dropout(self.dropout)(y, deterministic=deterministic)
    return constrain_tokens((x + y).astype(self.dtype))


class _ScanBlock(TransformerBlock):
  """The same block with the (carry, output) signature `nn.scan` expects."""

  def __call__(self, x, mask, deterministic):
    return super().__call__(x, mask, deterministic), None


def _remat(block_cls, policy_name: str, scan_layers: bool):
  # Argument 3 is `deterministic` (0 is the module itself): a Python bool.
  return remat_lib.remat(block_cls, policy_name, prevent_cse=not scan_layers,
                         static_argnums=(3,))


class TransformerStack(nn.Module):
  """`depth` pre-LN transformer blocks of width `width`.

  With `scan_layers` the blocks run under `nn.scan` and their parameters are
  stacked under `blocks` on a leading LAYERS axis of size `depth`; without it
  they are `blocks_0` ... `blocks_{depth-1}` in a Python loop, with the same
  math. `remat_policy` is 'none', 'full' or 'dots'.
  """
  width: int
  depth: int
  num_heads: int
  mlp_ratio: float = 4.0
  dropout: float = 0.0
  dtype: Dtype = jnp.float32
  remat_policy: str = "none"
  scan_layers: bool = True
  causal: bool = False

  @nn.compact
  def __call__(self, x: jnp.ndarray, mask: jnp.ndarray | None = None,
               deterministic: bool = True) -> jnp.ndarray:
    """Runs the blocks.

    Args:
      x: [batch, length, width].
      mask: None; a key padding mask [batch, length] (True = real token),
        combined with `causal` by `make_attention_mask`; or a 4-D bool
        attention mask broadcastable to [batch, heads, length, length]
        (True = may attend), used as given (`causal` is then ignored).
      deterministic: disables dropout.

    Returns:
      [batch, length, width] in `dtype`.
    """
    if x.shape[-1] != self.width:
      raise ValueError(f"input width {x.shape[-1]} != stack width {self.width}")
    if mask is None or mask.ndim == 2:
      mask = make_attention_mask(mask, causal=self.causal, length=x.shape[1])
    elif mask.ndim != 4:
      raise ValueError(f"mask must be [B, L] or 4-D [B|1, H|1, L|1, L], got "
                       f"{mask.shape}")
    x = constrain_tokens(x.astype(self.dtype))
    block_kwargs = dict(num_heads=self.num_heads, mlp_ratio=self.mlp_ratio,
                        dropout=self.dropout, dtype=self.dtype)
    if self.scan_layers:
      block_cls = _remat(_ScanBlock, self.remat_policy, scan_layers=True)
      blocks = nn.scan(
          block_cls,
          variable_axes={"params": 0},
          split_rngs={"params": True, "dropout": True},
          in_axes=(nn.broadcast, nn.broadcast),
          length=self.depth,
          metadata_params={nn.PARTITION_NAME: LAYERS},
      )(**block_kwargs, name="blocks")
      x, _ = blocks(x, mask, deterministic)
    else:
      block_cls = _remat(TransformerBlock, self.remat_policy, scan_layers=False)
      for i in range(self.depth):
        x = block_cls(**block_kwargs, name=f"blocks_{i}")(x, mask,
                                                          deterministic)
    return x


def unstack_block_params(stack_params: Any) -> dict:
  """A scanned stack's params ({'blocks': stacked on LAYERS}) as an unscanned
  stack's ({'blocks_0': ..., 'blocks_{depth-1}': ...}), e.g. to load a scanned
  checkpoint into a `scan_layers=False` model. Boxes are dropped."""
  stacked = nn.unbox(stack_params["blocks"])
  depth = jax.tree.leaves(stacked)[0].shape[0]
  return {f"blocks_{i}": jax.tree.map(lambda p, i=i: p[i], stacked)
          for i in range(depth)}


def unscan_params(params: Any) -> Any:
  """Every scanned stack in a params tree unstacked (`unstack_block_params`),
  so that a model built with `scan_layers=False` can apply them."""
  if not isinstance(params, dict):
    return params
  if "blocks" in params:
    rest = {k: unscan_params(v) for k, v in params.items() if k != "blocks"}
    return {**rest, **unstack_block_params(params)}
  return {k: unscan_params(v) for k, v in params.items()}
