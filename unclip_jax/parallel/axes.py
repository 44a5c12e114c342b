"""Logical axis names used by every model, and the default logical->mesh rules.

Models name their parameter and activation axes with these strings
(`nn.with_logical_partitioning`, `nn.with_logical_constraint`); configs map them
to the mesh axes ('data', 'fsdp', 'tensor'). A logical name may have several
rules, tried in order (fallbacks, as in MaxText): see
`partitioning.resolve_spec`.
"""

MESH_AXES = ("data", "fsdp", "tensor")

# Parameter axes.
EMBED = "embed"  # model width of a transformer / embedding vectors
MLP = "mlp"  # hidden width of a feed-forward block
HEADS = "heads"  # attention heads
KV = "kv"  # width of one attention head
VOCAB = "vocab"  # token vocabulary
CONV_IN = "conv_in"  # input channels of a convolution kernel
CONV_OUT = "conv_out"  # output channels of a convolution kernel
NORM = "norm"  # scale / bias of a normalisation layer
LAYERS = "layers"  # the stacked axis of blocks run under nn.scan
# Axes that are never sharded (positions, kernel spatial dims, patch pixels).
KEEP = None

# Activation axes.
ACT_BATCH = "activation_batch"
ACT_LENGTH = "activation_length"
ACT_EMBED = "activation_embed"
ACT_HEADS = "activation_heads"
ACT_MLP = "activation_mlp"
ACT_HEIGHT = "activation_height"
ACT_WIDTH = "activation_width"
ACT_CHANNELS = "activation_channels"

# Default rules. Activations: batch over ('data', 'fsdp'), heads / MLP /
# channels over 'tensor'. Parameters: FSDP on the model width and on conv input
# channels, tensor parallelism on heads / MLP / vocabulary / conv output
# channels. A name listed twice falls back to its second rule when the first
# mesh axis is taken, size 1 or does not divide the dimension
# (partitioning.resolve_spec): without tensor parallelism an MLP bias or an RGB
# conv's kernel is still split over 'fsdp'.
DEFAULT_RULES = (
    (ACT_BATCH, ("data", "fsdp")),
    (ACT_LENGTH, None),
    (ACT_EMBED, None),
    (ACT_HEADS, "tensor"),
    (ACT_MLP, "tensor"),
    (ACT_HEIGHT, None),
    (ACT_WIDTH, None),
    (ACT_CHANNELS, "tensor"),
    (EMBED, "fsdp"),  # never "tensor": that would split the contraction
    (MLP, "tensor"),
    (MLP, "fsdp"),
    (HEADS, "tensor"),
    (HEADS, "fsdp"),
    (KV, None),
    (VOCAB, "tensor"),
    (VOCAB, "fsdp"),
    (CONV_IN, "fsdp"),
    (CONV_OUT, "tensor"),
    (CONV_OUT, "fsdp"),
    (NORM, None),
    (LAYERS, None),
)
