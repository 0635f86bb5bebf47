import jax
import jax.numpy as jnp
import numpy as np
import pytest

from segjax.evaluation.segmentation_metrics import confusion_matrix, metrics_from_confusion


def test_confusion_and_metrics_match_hand_computation():
  labels = jnp.array([[0, 0, 1], [1, 2, 255]])
  predictions = jnp.array([[0, 1, 1], [1, 1, 2]])
  valid = jnp.ones((2, 3), bool)
  confusion = confusion_matrix(predictions, labels, valid, 3)
  # pairs (label, pred): (0,0) (0,1) (1,1) (1,1) (2,1); the 255 pixel is ignored.
  np.testing.assert_array_equal(confusion, [[1, 1, 0], [0, 2, 0], [0, 1, 0]])
  metrics = metrics_from_confusion(np.asarray(confusion), ['bg', 'a', 'b'])
  # IoU: class 0 = 1 / (2 + 1 - 1); class 1 = 2 / (2 + 4 - 2); class 2 = 0 / 1.
  assert metrics['iou/bg'] == pytest.approx(0.5)
  assert metrics['iou/a'] == pytest.approx(0.5)
  assert metrics['iou/b'] == pytest.approx(0.0)
  assert metrics['miou'] == pytest.approx(1 / 3)
  assert metrics['pixel_accuracy'] == pytest.approx(3 / 5)
  assert metrics['mean_accuracy'] == pytest.approx((0.5 + 1.0 + 0.0) / 3)


def test_padding_is_not_counted_and_absent_classes_leave_the_mean():
  labels = jnp.array([0, 1, 1, 3])
  predictions = jnp.array([0, 1, 0, 0])
  valid = jnp.array([True, True, True, False])
  confusion = np.asarray(confusion_matrix(predictions, labels, valid, 4))
  assert confusion.sum() == 3
  metrics = metrics_from_confusion(confusion)
  # class 0: tp 1, union 1 + 2 - 1 = 2; class 1: tp 1, union 2 + 1 - 1 = 2;
  # classes 2 and 3 never appear (3 only in padding) -> NaN, excluded from the mean.
  assert np.isnan(metrics['iou/2']) and np.isnan(metrics['iou/3'])
  assert metrics['miou'] == pytest.approx(0.5)


def test_confusion_sums_over_batches_equal_one_big_batch():
  rng = np.random.default_rng(0)
  labels = rng.integers(0, 5, size=(4, 16, 16))
  labels[:, :2] = 255
  predictions = rng.integers(0, 5, size=(4, 16, 16))
  valid = np.ones_like(labels, bool)
  whole = confusion_matrix(predictions, labels, valid, 5)
  parts = sum(confusion_matrix(predictions[i], labels[i], valid[i], 5) for i in range(4))
  np.testing.assert_array_equal(whole, parts)
  # reference count with numpy
  keep = labels != 255
  reference = np.zeros((5, 5), int)
  np.add.at(reference, (labels[keep], predictions[keep]), 1)
  np.testing.assert_array_equal(whole, reference)
  jitted = jax.jit(confusion_matrix, static_argnums=3)(predictions, labels, valid, 5)
  np.testing.assert_array_equal(jitted, reference)


def test_bad_confusion_shape_raises():
  with pytest.raises(ValueError, match='square'):
    metrics_from_confusion(np.zeros((3, 4)))
