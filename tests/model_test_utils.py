"""Helpers shared by the backbone tests."""

import jax
import jax.numpy as jnp
import numpy as np

TINY = 1 / 16  # width multiplier that keeps CPU tests fast


def count(tree) -> int:
  """Number of scalars in a pytree of arrays or ShapeDtypeStructs."""
  return sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(tree))


def abstract_init(model, shape=(1, 224, 224, 3)):
  """The model's variables as shapes only (jax.eval_shape: nothing is allocated)."""
  x = jax.ShapeDtypeStruct(shape, jnp.float32)
  return jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), x)
