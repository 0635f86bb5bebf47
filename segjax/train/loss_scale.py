"""Dynamic loss scaling for float16 training (`config.loss_scaling`).

float16 keeps 5 exponent bits: gradients below ~6e-8 flush to zero and
activations' cotangents above 65504 overflow. The step multiplies the loss by
`scale` before differentiating, so small cotangents stay representable, and
divides the float32 parameter gradients by it before the update. A step whose
scaled gradients are not finite is skipped (`TrainState.apply_gradients_if_finite`)
and halves the scale; `GROWTH_INTERVAL` finite steps in a row double it. These
are the rules and defaults of Micikevicius et al., "Mixed Precision Training"
(ICLR 2018), as PyTorch's `GradScaler` uses them (initial 2**16, interval 2000).

bfloat16 has float32's exponent range and needs no scaling: `'auto'` scales only
when `model.dtype` is 'float16'. The scale and its count of good steps live in
the TrainState (`TrainState.loss_scale`) and in checkpoints, so a resumed run
continues with the scale it had.

An overflow is the scale's business, not a fault: it is counted in the train
metrics ('overflow') and does not trigger `config.nonfinite`. It does when the loss
itself is not finite, or the gradients are not finite with the scale already at
`MIN_SCALE` (no scaling left to blame).
"""

from __future__ import annotations

from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp

LOSS_SCALINGS = ('auto', 'dynamic', 'none')
INITIAL_SCALE = 2.0 ** 16
GROWTH_INTERVAL = 2000
MIN_SCALE = 1.0


def validate_loss_scaling(value: Any) -> None:
  if value not in LOSS_SCALINGS:
    raise ValueError(f'config.loss_scaling={value!r} is not one of {LOSS_SCALINGS} '
                     "('auto': dynamic when model.dtype is 'float16')")


def enabled(config) -> bool:
  """Whether `config` trains with dynamic loss scaling."""
  choice = config.get('loss_scaling', 'auto')
  return choice == 'dynamic' or (choice == 'auto' and config.model.get('dtype') == 'float16')


def initial(config) -> 'DynamicLossScale | None':
  """The loss scale a fresh TrainState of `config` starts with (None: no scaling)."""
  return DynamicLossScale.create() if enabled(config) else None


@flax.struct.dataclass
class DynamicLossScale:
  """The current scale (float32) and the finite steps since it last changed (int32)."""
  scale: jnp.ndarray
  good_steps: jnp.ndarray

  @classmethod
  def create(cls, scale: float = INITIAL_SCALE) -> 'DynamicLossScale':
    return cls(scale=jnp.asarray(scale, jnp.float32), good_steps=jnp.zeros((), jnp.int32))

  def update(self, finite: jnp.ndarray) -> 'DynamicLossScale':
    """After a step: halve on overflow (not below MIN_SCALE), double after GROWTH_INTERVAL
    finite steps in a row."""
    good = jnp.where(finite, self.good_steps + 1, 0)
    grow = good >= GROWTH_INTERVAL
    scale = jnp.where(finite, jnp.where(grow, self.scale * 2.0, self.scale),
                      jnp.maximum(self.scale * 0.5, MIN_SCALE))
    return DynamicLossScale(scale=scale, good_steps=jnp.where(grow, 0, good))

  def to_dict(self) -> dict[str, jnp.ndarray]:
    return {'scale': self.scale, 'good_steps': self.good_steps}

  @classmethod
  def from_dict(cls, arrays: dict[str, Any]) -> 'DynamicLossScale':
    return cls(scale=jnp.asarray(arrays['scale'], jnp.float32),
               good_steps=jnp.asarray(arrays['good_steps'], jnp.int32))


def value_and_grad(loss_fn: Callable, params, loss_scale: DynamicLossScale | None):
  """`jax.value_and_grad(loss_fn, has_aux=True)(params)`, differentiating `scale * loss`
  and returning the unscaled loss and gradients. Without a loss scale: exactly that call."""
  if loss_scale is None:
    return jax.value_and_grad(loss_fn, has_aux=True)(params)

  def scaled(p):
    loss, aux = loss_fn(p)
    return loss * loss_scale.scale, (loss, aux)

  (_, (loss, aux)), grads = jax.value_and_grad(scaled, has_aux=True)(params)
  inverse = 1.0 / loss_scale.scale
  return (loss, aux), jax.tree_util.tree_map(lambda g: g * inverse.astype(g.dtype), grads)


def after_step(new_state, loss_scale: DynamicLossScale | None, finite: jnp.ndarray,
               loss: jnp.ndarray):
  """(new_state with the updated scale, nonfinite flag, extra metrics) after a step.

  `finite`: the step's loss and gradients were finite (its update was applied);
  `loss`: the global unscaled loss. Without a loss scale, nonfinite is `not finite`.
  """
  if loss_scale is None:
    return new_state, 1.0 - finite.astype(jnp.float32), {}
  fault = ~jnp.isfinite(loss) | (~finite & (loss_scale.scale <= MIN_SCALE))
  metrics = {'loss_scale': loss_scale.scale, 'overflow': 1.0 - finite.astype(jnp.float32)}
  return (new_state.replace(loss_scale=loss_scale.update(finite)),
          fault.astype(jnp.float32), metrics)
