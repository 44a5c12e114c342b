"""Rematerialisation by config: the decoder's UNet and caption transformer
recompute instead of storing ("full" / "dots"), with the same loss and
gradients as storing everything."""
import flax.linen as nn
import jax
import ml_collections
import numpy as np
import pytest

from configs import clip, decoder, upsampler
from tests.parallel.test_precision import random_batch
from unclip_jax.compile import stage_for_compile
from unclip_jax.errors import WorkdirError
from unclip_jax.train import config_checks


def _grad_fn(remat):
  # Not type-safe: configs/decoder.py keeps `model.remat` a bool.
  config = ml_collections.ConfigDict(decoder.get_config("tiny").to_dict(),
                                     type_safe=False)
  config.model.remat = remat
  clip_config = clip.get_config("tiny")
  stage = stage_for_compile(config, clip_config)
  structs = stage.abstract_batch()
  batch = random_batch(structs, clip_config.tokenizer.vocab_size)
  return stage, batch, jax.value_and_grad(stage.loss, has_aux=True)


@pytest.fixture(scope="module")
def params():
  stage, _, _ = _grad_fn("none")
  abstract = nn.unbox(jax.eval_shape(stage.init_params, jax.random.key(0)))
  draw = np.random.default_rng(1)
  return jax.tree.map(lambda a: draw.normal(0, 0.1, a.shape).astype(a.dtype),
                      abstract)


def test_remat_policies_recompute_every_block(params):
  _, batch, grad_fn = _grad_fn("dots")
  jaxpr = str(jax.make_jaxpr(grad_fn)(params, batch, jax.random.key(2)))
  # Res, attention and caption blocks are checkpointed (remat primitives).
  assert jaxpr.count("remat") >= 8
  assert "DotsSaveable(only_if_no_batch_dims=True)" in jaxpr


def test_full_remat_gives_the_same_loss_and_gradients(params):
  results = []
  for remat in (False, "full"):
    _, batch, grad_fn = _grad_fn(remat)
    results.append(jax.device_get(jax.jit(grad_fn)(params, batch,
                                                   jax.random.key(2))))
  (loss, _), grads = results[0]
  (remat_loss, _), remat_grads = results[1]
  np.testing.assert_allclose(remat_loss, loss, rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6),
               remat_grads, grads)


def test_a_run_may_resume_with_another_remat_policy(tmp_path):
  config = upsampler.get_config("tiny")
  config_checks.prepare_workdir(config, str(tmp_path))
  config.model.remat = "full"  # memory, not params: the same run
  config_checks.prepare_workdir(config, str(tmp_path))
  config.model.base_channels = 32
  with pytest.raises(WorkdirError, match="different model"):
    config_checks.prepare_workdir(config, str(tmp_path))
