import jax
import jax.numpy as jnp
import numpy as np
import pytest

from segjax.train.losses import cross_entropy_sum


def _reference(logits, labels, weights=None, ignore=255):
  logits = np.asarray(logits, np.float64)
  log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  total, count = 0.0, 0.0
  for index in np.ndindex(labels.shape):
    label = labels[index]
    if label == ignore:
      continue
    w = 1.0 if weights is None else weights[label]
    total += -log_probs[index + (label,)] * w
    count += w
  return total, count


def test_cross_entropy_matches_reference_with_ignore_and_weights():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(2, 4, 5, 3)).astype(np.float32)
  labels = rng.integers(0, 3, size=(2, 4, 5))
  labels[0, 0, :] = 255
  for weights in (None, [0.5, 2.0, 1.0]):
    total, count = cross_entropy_sum(jnp.asarray(logits), jnp.asarray(labels),
                                     class_weights=weights)
    ref_total, ref_count = _reference(logits, labels, weights)
    assert float(total) == pytest.approx(ref_total, rel=1e-5)
    assert float(count) == pytest.approx(ref_count, rel=1e-6)


def test_uniform_logits_give_log_num_classes():
  logits = jnp.zeros((1, 2, 2, 11))
  labels = jnp.array([[[0, 10], [255, 3]]])
  total, count = cross_entropy_sum(logits, labels)
  assert float(count) == 3
  assert float(total / count) == pytest.approx(np.log(11), rel=1e-6)


def test_ignored_pixels_get_no_gradient():
  logits = jnp.ones((1, 1, 2, 3))
  labels = jnp.array([[[1, 255]]])
  grads = jax.grad(lambda x: cross_entropy_sum(x, labels)[0])(logits)
  assert np.all(np.asarray(grads[0, 0, 1]) == 0)
  assert np.any(np.asarray(grads[0, 0, 0]) != 0)


def test_bad_class_weights_raise():
  with pytest.raises(ValueError, match='class_weights'):
    cross_entropy_sum(jnp.zeros((1, 2, 2, 3)), jnp.zeros((1, 2, 2), int), class_weights=[1.0])
