"""Benchmarks: speed goals are checked here, never in timed tests.

`python -m unclip_jax.bench COMMAND` (see __main__.py): `ceiling` (this
machine's matmul rates), `train_step` (any stage, synthetic or real data),
`sampling` (any generator's compiled sampler), `chain` (prompts per second
through trained workdirs). Every report is one JSON line; times are the median,
min and max of repeated measurements in one process, with the matmul ceilings
measured in that same process (compare ratios within one run: machines are
shared and noisy).
"""
