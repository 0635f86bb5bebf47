"""Helpers shared by the backbone tests."""

import jax
import jax.numpy as jnp
import numpy as np

from segjax.models import layers

TINY = 1 / 16  # width multiplier that keeps CPU tests fast


def count(tree) -> int:
  """Number of scalars in a pytree of arrays or ShapeDtypeStructs."""
  return sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(tree))


def abstract_init(model, shape=(1, 224, 224, 3)):
  """The model's variables as shapes only (jax.eval_shape: nothing is allocated)."""
  x = jax.ShapeDtypeStruct(shape, jnp.float32)
  return jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), x)


def conv_dilations(model, x) -> list[tuple[int, int]]:
  """rhs_dilation of every convolution `model` runs on `x` (eval mode), in order."""
  # XLA's filter gradient keeps every conv a top-level primitive ('auto' wraps the 1x1s
  # in a custom_vjp call on CPU).
  with layers.conv_weight_grad('xla'):
    jaxpr = jax.make_jaxpr(lambda x: model.init_with_output(jax.random.key(0), x,
                                                            train=False)[0])(x)
  return [tuple(eqn.params['rhs_dilation']) for eqn in jaxpr.eqns
          if eqn.primitive.name == 'conv_general_dilated']
