"""The one-command demo: every stage at its demo preset, then held-out samples.

`python -m unclip_jax.demo --workdir DIR` (see `unclip_jax.demo.__main__`).
"""
