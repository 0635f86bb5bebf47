"""The training state: one pytree holding everything a step reads or writes."""

from __future__ import annotations

from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import optax


@flax.struct.dataclass
class TrainState:
  """params, BatchNorm statistics, optimizer state, step, rng (and a loss scale).

  `rng` is a fixed base key; the step's dropout key is `fold_in(rng, step)`, so a
  resumed run draws exactly the keys an uninterrupted one would.
  """
  step: jnp.ndarray
  params: Any
  batch_stats: Any
  opt_state: Any
  rng: jnp.ndarray
  apply_fn: Callable = flax.struct.field(pytree_node=False)
  tx: optax.GradientTransformation = flax.struct.field(pytree_node=False)
  # float16 training's DynamicLossScale (segjax.train.loss_scale); None otherwise.
  loss_scale: Any = None

  def apply_gradients(self, grads, **changes) -> 'TrainState':
    updates, opt_state = self.tx.update(grads, self.opt_state, self.params)
    params = optax.apply_updates(self.params, updates)
    return self.replace(step=self.step + 1, params=params, opt_state=opt_state, **changes)

  def apply_gradients_if_finite(self, grads, loss: jnp.ndarray,
                                **changes) -> tuple['TrainState', jnp.ndarray]:
    """`apply_gradients` if `loss` and every gradient are finite; else only `step + 1`.

    A skipped step keeps params, optimizer state and `changes`' old values (BatchNorm
    statistics of a non-finite forward pass are dropped too), so no NaN reaches the
    state, and the step counter still advances so the data order and rng are those of
    a run without the bad batch. With finite values the result is bit-identical to
    `apply_gradients`. `loss` must be the same on every device (a global value).
    Returns (state, finite) with `finite` a bool scalar.
    """
    finite = all_finite(loss, grads)
    # A conditional, not a select of both states: with `jnp.where(finite, new, old)` XLA
    # fused the new optimizer moments into both the parameters' and the moments' update,
    # each then reading the other's old buffer, and copied the whole donated state at the
    # step's start to keep them (FCN-ResNet50 train step: 226 copies, 270 MB, live through
    # the step).
    return jax.lax.cond(finite, lambda s: s.apply_gradients(grads, **changes),
                        lambda s: s.replace(step=s.step + 1), self), finite


def all_finite(loss: jnp.ndarray, grads) -> jnp.ndarray:
  """Whether `loss` and every leaf of `grads` are finite: a bool scalar."""
  finite = jnp.isfinite(loss)
  for g in jax.tree_util.tree_leaves(grads):
    finite &= jnp.all(jnp.isfinite(g))
  return finite


def call_jitted_once(fn: Callable[..., Any], *args: Any) -> Any:
  """`jax.jit(fn)(*args)`, with the compiled executable dropped after the call.

  For work a process does once, such as model init, whose cached executable would
  otherwise stay resident for the whole run: dropping FCN-ResNet50's jitted init
  (320x320) freed ~85 MB in a probe (experiments/benchmarks/README.md, "Model init").
  """
  jitted = jax.jit(fn)
  try:
    return jitted(*args)
  finally:
    jitted.clear_cache()


def create_train_state(model, tx: optax.GradientTransformation, rng: jax.Array,
                       input_shape: tuple[int, ...]) -> TrainState:
  """Initialises the model on a zero batch of `input_shape` ([B, H, W, 3])."""
  init_rng, state_rng = jax.random.split(rng)
  variables = model.init({'params': init_rng, 'dropout': init_rng},
                         jnp.zeros(input_shape, jnp.float32), train=False)
  params = variables['params']
  batch_stats = variables.get('batch_stats', {})
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, batch_stats=batch_stats,
                    opt_state=tx.init(params), rng=state_rng, apply_fn=model.apply, tx=tx)
