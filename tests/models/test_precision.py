"""precision.py: compute dtypes by name."""
import jax.numpy as jnp
import pytest

from unclip_jax.models.precision import DTYPES, dtype_named


def test_dtype_named_knows_the_table_and_refuses_in_one_line():
  assert dtype_named("bfloat16") is jnp.bfloat16
  assert dtype_named("float32") is jnp.float32
  assert set(DTYPES) == {"bfloat16", "float32"}
  for bad in ("fp16", "", None):
    with pytest.raises(ValueError) as error:
      dtype_named(bad)
    assert str(error.value) == (f"dtype={bad!r}: use one of "
                                "['bfloat16', 'float32']")
