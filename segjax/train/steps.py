"""The pure train and eval steps. Parallel drivers (parallel.py) wrap these.

Data-parallel semantics: the loss is the mean over the labelled pixels of the
*global* batch. Each device sums its pixel losses and divides by the global pixel
count (a `psum` of the per-device counts); the gradient of the global mean is then
the `psum` of the per-device gradients. This equals the single-device gradient
exactly (up to float summation order) even when devices hold different numbers of
labelled pixels, which a `pmean` of per-device means would not.
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import optax
from jax import lax

from segjax.evaluation.segmentation_metrics import confusion_matrix
from segjax.train.losses import cross_entropy_sum
from segjax.train.state import TrainState


def train_step(state: TrainState, batch: dict[str, jnp.ndarray], *,
               axis_name: str | None = None, ignore_label: int = 255,
               class_weights: Sequence[float] | None = None, aux_loss_weight: float = 0.4,
               learning_rate_fn=None) -> tuple[TrainState, dict[str, Any]]:
  """One SGD step on `batch` = {'image': [B, H, W, 3] float, 'label': [B, H, W] int}.

  `axis_name` names the pmap axis (None under jit / one device). The returned
  metrics are global-batch values, identical on every device.
  """
  dropout_rng = jax.random.fold_in(state.rng, state.step)
  if axis_name is not None:
    dropout_rng = jax.random.fold_in(dropout_rng, lax.axis_index(axis_name))

  def global_sum(x):
    return x if axis_name is None else lax.psum(x, axis_name)

  def loss_fn(params):
    outputs, mutated = state.apply_fn(
        {'params': params, 'batch_stats': state.batch_stats}, batch['image'], train=True,
        mutable=['batch_stats'], rngs={'dropout': dropout_rng})
    loss_sum, count = cross_entropy_sum(outputs['logits'], batch['label'],
                                        ignore_label=ignore_label, class_weights=class_weights)
    total_sum = loss_sum
    if 'aux_logits' in outputs:
      aux_sum, _ = cross_entropy_sum(outputs['aux_logits'], batch['label'],
                                     ignore_label=ignore_label, class_weights=class_weights)
      total_sum = total_sum + aux_loss_weight * aux_sum
    denominator = jnp.maximum(lax.stop_gradient(global_sum(count)), 1.0)
    aux = (mutated.get('batch_stats', {}), outputs['logits'], loss_sum / denominator)
    return total_sum / denominator, aux

  (loss, (batch_stats, logits, main_loss)), grads = jax.value_and_grad(
      loss_fn, has_aux=True)(state.params)
  grads = global_sum(grads)
  new_state = state.apply_gradients(grads, batch_stats=batch_stats)

  labels = batch['label']
  labelled = labels != ignore_label
  correct = jnp.sum((jnp.argmax(logits, -1) == labels) & labelled)
  metrics = {
      'loss': global_sum(loss),
      'main_loss': global_sum(main_loss),
      'pixel_accuracy': global_sum(correct) / jnp.maximum(global_sum(jnp.sum(labelled)), 1),
      'grad_norm': optax.global_norm(grads),
  }
  if learning_rate_fn is not None:
    metrics['learning_rate'] = learning_rate_fn(state.step)
  return new_state, metrics


def predict(state: TrainState, images: jnp.ndarray) -> jnp.ndarray:
  """[B, H, W, 3] normalised images -> [B, H, W, C] logits, inference mode."""
  outputs = state.apply_fn({'params': state.params, 'batch_stats': state.batch_stats},
                           images, train=False)
  return outputs['logits']


def eval_step(state: TrainState, batch: dict[str, jnp.ndarray], *, num_classes: int,
              axis_name: str | None = None) -> jnp.ndarray:
  """[C, C] confusion matrix of one batch (with 'valid' masking padding), summed over devices."""
  predictions = jnp.argmax(predict(state, batch['image']), axis=-1)
  confusion = confusion_matrix(predictions, batch['label'], batch['valid'], num_classes)
  return confusion if axis_name is None else lax.psum(confusion, axis_name)


def bind_train_step(config, *, axis_name: str | None, learning_rate_fn=None):
  """The train step with the config's loss options fixed; only (state, batch) remain."""
  class_weights = config.loss.class_weights
  return functools.partial(
      train_step, axis_name=axis_name, ignore_label=config.dataset.ignore_label,
      class_weights=tuple(class_weights) if class_weights else None,
      aux_loss_weight=config.loss.aux_weight, learning_rate_fn=learning_rate_fn)
