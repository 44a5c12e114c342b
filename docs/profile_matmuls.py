"""Where a stage's gradient step goes on this machine: the step's own matmuls and
convolutions (its jaxpr's dot_generals and convolutions, each jitted and timed
alone at its exact shapes, dtypes and precision, times how often it runs) against
the whole step, at issue #13's sizes. docs/performance.md reports it.

  python docs/profile_matmuls.py prior|decoder [float32|bfloat16] [tiny]

(run from the repository root; `tiny` shrinks the model to check the script).
"""
import collections, json, os, sys
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import flax.linen as nn, jax, jax.numpy as jnp, numpy as np
from jax.extend import core
from configs import clip as cc, decoder as dc, prior as pc
from unclip_jax.bench import timing
from unclip_jax.generators.base import ClipSizes
from unclip_jax.generators.decoder import Decoder
from unclip_jax.generators.prior import Prior
from unclip_jax.train import flops as F

stage, dtype = sys.argv[1], (sys.argv[2] if len(sys.argv) > 2 else "float32")
tiny = len(sys.argv) > 3
cl = cc.get_config("demo"); cl.tokenizer.context_length = 77
if stage == "prior":
  c = pc.get_config("demo"); c.model.update(width=512, depth=6, num_heads=8, text_context=77)
  c.batch_size = 64; cls = Prior
  if tiny: c.model.update(width=64, depth=2, num_heads=2); c.batch_size = 8
else:
  c = dc.get_config("demo"); c.data.resolution = 64
  c.model.update(base_channels=64, channel_mults=(1, 2, 3, 4), num_res_blocks=2, attention_resolutions=(8,))
  c.batch_size = 8; cls = Decoder
  if tiny: c.data.resolution = 16; c.model.update(base_channels=16, channel_mults=(1, 2), attention_resolutions=(8,)); c.batch_size = 2
c.dtype = dtype
g = cls.from_config(c, ClipSizes.from_config(cl))
params = jax.jit(lambda r: nn.unbox(g.init_params(r)))(jax.random.key(0))
batch = timing.synthetic_batch(g.abstract_batch(c.batch_size))
loss = lambda p: g.losses(p, batch, jax.random.key(1))[0].mean()
grad = jax.jit(jax.grad(loss))
step = timing.time_calls(lambda: grad(params), repeats=3)["median"]

ops = collections.Counter()
def walk(jaxpr, mult):
  for e in jaxpr.eqns:
    if e.primitive.name in ("dot_general", "conv_general_dilated"):
      key = (e.primitive.name, tuple((v.aval.shape, str(v.aval.dtype)) for v in e.invars[:2]),
             tuple(sorted((k, str(v)) for k, v in e.params.items())))
      ops[key] += mult
      ops_eqn[key] = e
    values = e.params.values()
    if e.params.get("branches_platforms"):  # lax.platform_dependent: ours only
      platforms = e.params["branches_platforms"]
      values = [e.params["branches"][next(
          (i for i, p in enumerate(platforms) if p and jax.default_backend() in p),
          platforms.index(None))]]
    for v in values:
      for j in F._sub_jaxprs(v):
        walk(j, mult * (e.params.get("length", 1) if e.primitive.name == "scan" else 1))
ops_eqn = {}
walk(jax.make_jaxpr(jax.grad(loss))(params).jaxpr, 1)
alone, total_flops = 0.0, 0.0
rows = []
for key, count in ops.items():
  e = ops_eqn[key]
  args = [jnp.ones(v.aval.shape, v.aval.dtype) for v in e.invars[:2]]
  fn = jax.jit(lambda a, b, e=e: e.primitive.bind(a, b, **e.params))
  t = timing.time_calls(lambda: fn(*args), repeats=5)["median"]
  fl = F.jaxpr_flops(jax.make_jaxpr(lambda a, b: e.primitive.bind(a, b, **e.params))(*args))
  alone += t * count; total_flops += fl * count
  rows.append((t * count, key[0], [s for s, _ in key[1]], count, fl / t / 1e9))
rows.sort(reverse=True)
print(json.dumps({"stage": stage, "dtype": dtype, "grad_step_s": step,
  "matmul_conv_alone_s": alone, "share_of_step": alone / step,
  "gflops": total_flops / 1e9, "step_gflops_per_s": total_flops / step / 1e9,
  "alone_gflops_per_s": total_flops / alone / 1e9, **timing.ceilings(),
  "top": [{"s": round(r[0], 4), "op": r[1], "shapes": r[2], "count": r[3], "gflops_per_s": round(r[4], 1)} for r in rows[:8]]}))
