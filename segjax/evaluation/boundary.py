"""Accuracy near object boundaries: the "trimap" evaluation of DeepLab v1 (§4.2, Fig. 5).

Kohli et al. (2009) and DeepLab v1 score predictions only inside a narrow band around
the ground-truth label boundaries, since that is where upsampling artefacts and the
dense CRF act; the whole-image mIoU is dominated by region interiors.

A pixel lies in the band of width w when some pixel within Chebyshev distance w of it
(a (2w+1) x (2w+1) window, clipped at the image border) has a different ground-truth
value. The ignore label counts as a value of its own here, so the band follows the
ignore rims that datasets draw around objects (VOC, digit_scenes); ignore pixels and
padding are then left out of the scores, as everywhere else.

    confusion = boundary_confusion(predictions, labels, valid, num_classes, width=2)
    metrics = boundary_metrics(confusion)  # {'trimap_accuracy', 'trimap_miou'}

Host-side NumPy/SciPy: it runs once over a split's predictions.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from segjax.evaluation.segmentation_metrics import metrics_from_confusion


def boundary_band(labels: np.ndarray, width: int) -> np.ndarray:
  """[..., H, W] labels -> bool [..., H, W], True within `width` px of a label change."""
  labels = np.asarray(labels)
  if labels.ndim < 2:
    raise ValueError(f'labels must be [..., H, W], got shape {labels.shape}')
  if int(width) < 1:
    raise ValueError(f'boundary band width must be an integer >= 1, got {width!r}')
  size = (1,) * (labels.ndim - 2) + (2 * int(width) + 1,) * 2
  high = ndimage.maximum_filter(labels, size=size, mode='nearest')
  low = ndimage.minimum_filter(labels, size=size, mode='nearest')
  return high != low


def confusion_counts(predictions: np.ndarray, labels: np.ndarray, counted: np.ndarray,
                     num_classes: int) -> np.ndarray:
  """[C, C] int64 host confusion matrix (rows = ground truth) over the `counted` pixels."""
  labels = np.asarray(labels, np.int64)[counted]
  predictions = np.asarray(predictions, np.int64)[counted]
  return np.bincount(labels * num_classes + predictions,
                     minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def boundary_confusion(predictions: np.ndarray, labels: np.ndarray, valid: np.ndarray | None,
                       num_classes: int, width: int) -> np.ndarray:
  """[C, C] int64 confusion matrix (rows = ground truth) over the band pixels only.

  Labels outside [0, num_classes) (ignore) and pixels with valid False are not counted.
  """
  predictions = np.asarray(predictions, np.int64)
  labels = np.asarray(labels, np.int64)
  if predictions.shape != labels.shape:
    raise ValueError(f'predictions {predictions.shape} and labels {labels.shape} differ in shape')
  counted = boundary_band(labels, width) & (labels >= 0) & (labels < num_classes)
  if valid is not None:
    counted &= np.asarray(valid, bool)
  return confusion_counts(predictions, labels, counted, num_classes)


def boundary_metrics(confusion: np.ndarray) -> dict[str, float]:
  """'trimap_accuracy' (pixel accuracy) and 'trimap_miou' inside the band."""
  metrics = metrics_from_confusion(confusion)
  return {'trimap_accuracy': metrics['pixel_accuracy'], 'trimap_miou': metrics['miou']}
