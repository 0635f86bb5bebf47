"""Pixel-wise losses for semantic segmentation."""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp


def cross_entropy_sum(logits: jnp.ndarray, labels: jnp.ndarray, *, ignore_label: int = 255,
                      class_weights: Sequence[float] | None = None,
                      valid: jnp.ndarray | None = None) -> tuple[jnp.ndarray, jnp.ndarray]:
  """Summed softmax cross-entropy over the labelled pixels, and their (weighted) count.

  Returning the sum and the count rather than a mean lets data-parallel callers
  divide by the *global* count, so the loss equals the single-device mean over the
  global batch however the batch is split (see `train_step`).

  Args:
    logits: [B, H, W, C] float.
    labels: [B, H, W] int; `ignore_label` and any value outside [0, C) are skipped.
    ignore_label: label value that contributes nothing (255 in VOC-style masks).
    class_weights: optional [C] per-class weights; the count is then the sum of the
      weights of the counted pixels (PyTorch's `CrossEntropyLoss(weight=...)` mean).
    valid: optional [B, H, W] bool, False for padding.

  Returns:
    (loss_sum, weight_sum), both float32 scalars.
  """
  num_classes = logits.shape[-1]
  labels = labels.astype(jnp.int32)
  counted = (labels != ignore_label) & (labels >= 0) & (labels < num_classes)
  if valid is not None:
    counted &= valid
  safe_labels = jnp.where(counted, labels, 0)
  log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  nll = -jnp.take_along_axis(log_probs, safe_labels[..., None], axis=-1)[..., 0]
  weights = counted.astype(jnp.float32)
  if class_weights is not None:
    class_weights = jnp.asarray(class_weights, jnp.float32)
    if class_weights.shape != (num_classes,):
      raise ValueError(f'class_weights has shape {class_weights.shape}, expected ({num_classes},)')
    weights = weights * class_weights[safe_labels]
  return jnp.sum(nll * weights), jnp.sum(weights)
