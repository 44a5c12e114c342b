"""Pre-LayerNorm transformer blocks, a scanned stack of them, and LayerNorm.

Shared by the CLIP towers (vit.py, text.py), the diffusion prior (prior.py)
and the UNet's caption encoder (unet_blocks.py); attention is attention.py's.
Every parameter carries logical axis names (unclip_jax.parallel.axes); the
stack runs its blocks under `nn.scan` so that compile time does not grow with
depth, with the block parameters stacked on a leading LAYERS axis.
"""
import functools
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
# (keys, values) of some tokens, each [batch, length, heads, head_dim]; a
# stack's cache has a leading [depth] axis on both.
KeyValue = tuple[jnp.ndarray, jnp.ndarray]
# The stacked cache's axes: layers unsharded, then those of every layer's keys.
CACHE_AXES = (None,) + attention.HEAD_AXES

REMAT_POLICIES = remat_lib.REMAT_POLICIES

dense_init = nn.initializers.xavier_uniform()
zeros = nn.initializers.zeros
ones = nn.initializers.ones


def constrain_tokens(x: jnp.ndarray) -> jnp.ndarray:
  """Sharding constraint for a [batch, length, width] activation."""
  return nn.with_logical_constraint(x, (ACT_BATCH, ACT_LENGTH, ACT_EMBED))


def layer_norm(dtype: Dtype, name: str, epsilon: float = 1e-5) -> nn.LayerNorm:
  """The LayerNorm of every model: named scale / bias, output in `dtype`
  (flax computes the statistics in float32). `epsilon` is 1e-5 everywhere
  except where a converted checkpoint's config says otherwise."""
  return nn.LayerNorm(
      epsilon=epsilon, dtype=dtype, name=name,
      scale_init=nn.with_logical_partitioning(ones, (NORM,)),
      bias_init=nn.with_logical_partitioning(zeros, (NORM,)))


def quick_gelu(x: jnp.ndarray) -> jnp.ndarray:
  """x * sigmoid(1.702 x): the GELU approximation OpenAI's CLIP was trained with
  (its checkpoints are only exact with it)."""
  return x * jax.nn.sigmoid(1.702 * x)


# The MLP nonlinearity by config name; "gelu" is the exact (erf) GELU.
ACTIVATIONS = {"gelu": functools.partial(nn.gelu, approximate=False),
               "quick_gelu": quick_gelu}


def causal_mask(length: int) -> jnp.ndarray:
  """[1, 1, length, length] bool: query i may attend to keys j <= i."""
  return jnp.tril(jnp.ones((length, length), jnp.bool_))[None, None]


def make_attention_mask(key_padding_mask: jnp.ndarray | None = None,
                        causal: bool = False,
                        length: int | None = None,
                        num_queries: int | None = None) -> jnp.ndarray | None:
  """Attention mask [batch | 1, 1, queries, length] from a causal flag and a
  key padding mask.

  Args:
    key_padding_mask: [batch, length] bool, True where a key is a real token.
    causal: also hide later keys from each query.
    length: the number of keys (needed only without `key_padding_mask`).
    num_queries: the queries are the last `num_queries` of the `length`
      positions (tokens run after a cached prefix); default all of them.

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
  num_queries = length if num_queries is None else num_queries
  # Query i sits at position i + offset of the key sequence.
  offset = length - num_queries
  mask = jnp.ones((1, 1, num_queries, length), jnp.bool_)
  if causal:
    mask = jnp.tri(num_queries, length, offset, dtype=jnp.bool_)[None, None]
  if key_padding_mask is not None:
    mask = mask & key_padding_mask[:, None, None, :].astype(jnp.bool_)
  return mask | jnp.eye(num_queries, length, offset, dtype=jnp.bool_)[None, None]


class MultiHeadAttention(nn.Module):
  """Multi-head self-attention (attention.py); logits and softmax in float32.

  Params: `qkv_kernel` [width, 3, heads, head_dim], `qkv_bias`, `out_kernel`
  [heads, head_dim, width], `out_bias`.
  """
  num_heads: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray, mask: jnp.ndarray | None,
               prefix_key_value: KeyValue | None = None,
               return_key_value: bool = False):
    """x: [batch, length, width]; mask: bool, broadcastable to
    [batch, heads, length, prefix + length].

    `prefix_key_value`: (keys, values) [batch, prefix, heads, head_dim] of
    earlier positions (a cached prefix), attended to before x's own.
    Returns [batch, length, width]; with `return_key_value` also the (keys,
    values) of x's tokens, to be cached.
    """
    width = x.shape[-1]
    if width % self.num_heads:
      raise ValueError(f"width {width} is not divisible by num_heads "
                       f"{self.num_heads}")
    query, key, value = attention.project_heads(
        self, x, num_outputs=3, num_heads=self.num_heads,
        head_dim=width // self.num_heads, dtype=self.dtype, name="qkv")
    own_key_value = (key, value)
    if prefix_key_value is not None:
      prefix_key, prefix_value = prefix_key_value
      key = nn.with_logical_constraint(
          jnp.concatenate([prefix_key.astype(key.dtype), key], axis=1),
          attention.HEAD_AXES)
      value = nn.with_logical_constraint(
          jnp.concatenate([prefix_value.astype(value.dtype), value], axis=1),
          attention.HEAD_AXES)
    attended = nn.with_logical_constraint(
        attention.dot_product_attention(query, key, value, mask),
        attention.HEAD_AXES)
    out = attention.merge_heads(self, attended, features=width,
                                dtype=self.dtype, name="out")
    return (out, own_key_value) if return_key_value else out


class MlpBlock(nn.Module):
  """Two-layer feed-forward block; `activation` names one of ACTIVATIONS."""
  hidden_dim: int
  dtype: Dtype = jnp.float32
  activation: str = "gelu"

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
    hidden = ACTIVATIONS[self.activation](hidden)
    return nn.Dense(
        width, dtype=self.dtype, name="fc_out",
        dot_general=dot_general_f32_accumulate,
        kernel_init=nn.with_logical_partitioning(dense_init, (MLP, EMBED)),
        bias_init=nn.with_logical_partitioning(zeros, (EMBED,)))(hidden)


class TransformerBlock(nn.Module):
  """x + Attn(LN(x)), then x + MLP(LN(x)); dropout on both residual branches.

  With `return_key_value` it returns (x, (keys, values) of x's tokens
  [batch, length, heads, head_dim]): what a prefix cache keeps per layer.
  """
  num_heads: int
  mlp_ratio: float = 4.0
  dropout: float = 0.0
  dtype: Dtype = jnp.float32
  return_key_value: bool = False
  activation: str = "gelu"
  layer_norm_eps: float = 1e-5

  @nn.compact
  def __call__(self, x: jnp.ndarray, mask: jnp.ndarray | None,
               deterministic: bool, prefix_key_value: KeyValue | None = None):
    """x: [batch, length, width]; `prefix_key_value` and `mask` as
    `MultiHeadAttention`'s."""
    x = constrain_tokens(x)
    y = layer_norm(self.dtype, "ln_attention", self.layer_norm_eps)(x)
    attended = MultiHeadAttention(self.num_heads, dtype=self.dtype,
                                  name="attention")(y, mask, prefix_key_value,
                                                    self.return_key_value)
    y, key_value = attended if self.return_key_value else (attended, None)
    y = nn.Dropout(self.dropout)(y, deterministic=deterministic)
    # Sums stay in the compute dtype: the f32-accumulated branches would
    # otherwise promote the residual stream (and break scan's carry type).
    x = constrain_tokens((x + y).astype(self.dtype))
    y = layer_norm(self.dtype, "ln_mlp", self.layer_norm_eps)(x)
    y = MlpBlock(int(x.shape[-1] * self.mlp_ratio), dtype=self.dtype,
                 activation=self.activation, name="mlp")(y)
    y = nn.Dropout(self.dropout)(y, deterministic=deterministic)
    x = constrain_tokens((x + y).astype(self.dtype))
    return (x, key_value) if self.return_key_value else x


class _ScanBlock(TransformerBlock):
  """The same block with the (carry, output) signature `nn.scan` expects: the
  per-layer prefix (keys, values) come in, and this layer's go out, as scanned
  inputs and outputs (stacked on the layer axis)."""

  def __call__(self, x, mask, deterministic, prefix_key_value=None):
    out = super().__call__(x, mask, deterministic, prefix_key_value)
    return out if self.return_key_value else (out, None)


def _remat(block_cls, policy_name: str, scan_layers: bool):
  # Argument 3 is `deterministic` (0 is the module itself): a Python bool.
  return remat_lib.remat(block_cls, policy_name, prevent_cse=not scan_layers,
                         static_argnums=(3,))


def _constrain_cache(cache: KeyValue) -> KeyValue:
  """Stacked (keys, values) [depth, batch, length, heads, head_dim] sharded as
  every layer's keys and values are."""
  return tuple(nn.with_logical_constraint(t, CACHE_AXES) for t in cache)


class TransformerStack(nn.Module):
  """`depth` pre-LN transformer blocks of width `width`.

  With `scan_layers` the blocks run under `nn.scan` and their parameters are
  stacked under `blocks` on a leading LAYERS axis of size `depth`; without it
  they are `blocks_0` ... `blocks_{depth-1}` in a Python loop, with the same
  math. `remat_policy` is 'none', 'full' or 'dots'. `activation` (a key of
  ACTIVATIONS) and `layer_norm_eps` exist for converted checkpoints.

  A prefix cache (causal stacks): run the prefix once with
  `return_key_values`, then later tokens alone with `prefix_key_values`; they
  see the same keys and values as in one pass over the whole sequence.
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
  activation: str = "gelu"
  layer_norm_eps: float = 1e-5

  @nn.compact
  def __call__(self, x: jnp.ndarray, mask: jnp.ndarray | None = None,
               deterministic: bool = True,
               prefix_key_values: KeyValue | None = None,
               return_key_values: bool = False):
    """Runs the blocks.

    Args:
      x: [batch, length, width].
      mask: None; a key padding mask [batch, keys] (True = real token),
        combined with `causal` by `make_attention_mask`; or a 4-D bool
        attention mask broadcastable to [batch, heads, length, keys]
        (True = may attend), used as given (`causal` is then ignored). keys =
        prefix + length: the cached prefix's keys come first.
      deterministic: disables dropout.
      prefix_key_values: every layer's (keys, values) of the positions before
        x's, [depth, batch, prefix, heads, head_dim] each, as returned by an
        earlier call with `return_key_values`.
      return_key_values: also return every layer's (keys, values) of x's
        tokens, [depth, batch, length, heads, head_dim] each.

    Returns:
      [batch, length, width] in `dtype`; with `return_key_values`, (that,
      (keys, values)).
    """
    if x.shape[-1] != self.width:
      raise ValueError(f"input width {x.shape[-1]} != stack width {self.width}")
    length = x.shape[1]
    prefix = 0
    if prefix_key_values is not None:
      prefix_key_values = _constrain_cache(prefix_key_values)
      prefix = prefix_key_values[0].shape[2]
    if mask is None or mask.ndim == 2:
      mask = make_attention_mask(mask, causal=self.causal,
                                 length=prefix + length, num_queries=length)
    elif mask.ndim != 4:
      raise ValueError(f"mask must be [B, L] or 4-D [B|1, H|1, L|1, L], got "
                       f"{mask.shape}")
    x = constrain_tokens(x.astype(self.dtype))
    block_kwargs = dict(num_heads=self.num_heads, mlp_ratio=self.mlp_ratio,
                        dropout=self.dropout, dtype=self.dtype,
                        return_key_value=return_key_values,
                        activation=self.activation,
                        layer_norm_eps=self.layer_norm_eps)
    if self.scan_layers:
      block_cls = _remat(_ScanBlock, self.remat_policy, scan_layers=True)
      blocks = nn.scan(
          block_cls,
          variable_axes={"params": 0},
          split_rngs={"params": True, "dropout": True},
          # The cache is scanned: layer i reads the prefix's row i.
          in_axes=(nn.broadcast, nn.broadcast, 0),
          length=self.depth,
          metadata_params={nn.PARTITION_NAME: LAYERS},
      )(**block_kwargs, name="blocks")
      x, key_values = blocks(x, mask, deterministic, prefix_key_values)
    else:
      block_cls = _remat(TransformerBlock, self.remat_policy, scan_layers=False)
      per_layer = []
      for i in range(self.depth):
        layer_prefix = (None if prefix_key_values is None else
                        tuple(t[i] for t in prefix_key_values))
        out = block_cls(**block_kwargs, name=f"blocks_{i}")(
            x, mask, deterministic, layer_prefix)
        if return_key_values:
          x, key_value = out
          per_layer.append(key_value)
        else:
          x = out
      key_values = (tuple(jnp.stack(t) for t in zip(*per_layer))
                    if return_key_values else None)
    if return_key_values:
      return x, _constrain_cache(key_values)
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
