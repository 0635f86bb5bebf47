"""Semantic segmentation metrics from a global confusion matrix.

The confusion matrix is accumulated on device batch by batch (an integer
[num_classes, num_classes] array, rows = ground truth, columns = prediction) and
only reduced to scalars on the host at the end, so the metrics are exact over the
whole split regardless of batching or the number of devices (the "global" mIoU of
PASCAL VOC, MMSegmentation and scenic, not a mean of per-image IoUs).
"""

from __future__ import annotations

from typing import Sequence

import jax.numpy as jnp
import numpy as np


def confusion_matrix(predictions: jnp.ndarray, labels: jnp.ndarray, valid: jnp.ndarray,
                     num_classes: int) -> jnp.ndarray:
  """Counts (label, prediction) pairs over the valid pixels.

  Args:
    predictions: [...] int class ids in [0, num_classes).
    labels: [...] int ground-truth ids; values outside [0, num_classes) (the ignore
      label 255) are not counted.
    valid: [...] bool, False for padding pixels.
    num_classes: static number of classes C.

  Returns:
    [C, C] int32, entry (i, j) = number of valid pixels with label i predicted as j.
  """
  labels = labels.astype(jnp.int32)
  predictions = predictions.astype(jnp.int32)
  counted = valid & (labels >= 0) & (labels < num_classes)
  flat = jnp.where(counted, labels * num_classes + predictions, 0).reshape(-1)
  counts = jnp.bincount(flat, weights=counted.reshape(-1).astype(jnp.int32),
                        length=num_classes * num_classes)
  return counts.astype(jnp.int32).reshape(num_classes, num_classes)


def metrics_from_confusion(confusion: np.ndarray,
                           class_names: Sequence[str] | None = None) -> dict[str, float]:
  """mIoU, per-class IoU, pixel accuracy and mean class accuracy.

  A class that appears neither in the ground truth nor in the predictions has an
  undefined IoU and is left out of the mean (as MMSegmentation does); a class that
  is predicted but never present gets IoU 0 and counts.

  Returns a flat dict: 'miou', 'pixel_accuracy', 'mean_accuracy' and 'iou/<name>'
  per class (NaN where undefined).
  """
  confusion = np.asarray(confusion, dtype=np.float64)
  if confusion.ndim != 2 or confusion.shape[0] != confusion.shape[1]:
    raise ValueError(f'confusion matrix must be square [C, C], got shape {confusion.shape}')
  num_classes = confusion.shape[0]
  if class_names is None:
    class_names = [str(i) for i in range(num_classes)]
  if len(class_names) != num_classes:
    raise ValueError(f'{len(class_names)} class names for {num_classes} classes')
  true_positive = np.diag(confusion)
  label_count = confusion.sum(axis=1)
  predicted_count = confusion.sum(axis=0)
  union = label_count + predicted_count - true_positive
  with np.errstate(divide='ignore', invalid='ignore'):
    iou = np.where(union > 0, true_positive / union, np.nan)
    class_accuracy = np.where(label_count > 0, true_positive / label_count, np.nan)
  total = confusion.sum()
  metrics = {
      'miou': float(np.nanmean(iou)) if np.any(union > 0) else float('nan'),
      'pixel_accuracy': float(true_positive.sum() / total) if total > 0 else float('nan'),
      'mean_accuracy': (float(np.nanmean(class_accuracy))
                        if np.any(label_count > 0) else float('nan')),
  }
  for name, value in zip(class_names, iou):
    metrics[f'iou/{name}'] = float(value)
  return metrics
