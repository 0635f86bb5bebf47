"""Tests for segjax.models.detection.nms: same kept boxes as torchvision's nms / batched_nms."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from segjax.models.detection.nms import batched_nms, nms


def random_boxes(rng, n, extent=100.0):
  xy = rng.uniform(0, extent, size=(n, 2))
  wh = rng.uniform(2, extent / 3, size=(n, 2))
  return np.concatenate([xy, xy + wh], axis=1).astype(np.float32)


def reference_nms(boxes, scores, threshold):
  """Greedy NMS in NumPy with the documented tie rule (stable sort, lower index first)."""
  order = np.argsort(-scores, kind='stable')
  areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
  suppressed = np.zeros(len(boxes), bool)
  keep = []
  for i in order:
    if suppressed[i]:
      continue
    keep.append(i)
    w = np.maximum(np.minimum(boxes[i, 2], boxes[:, 2]) - np.maximum(boxes[i, 0], boxes[:, 0]), 0)
    h = np.maximum(np.minimum(boxes[i, 3], boxes[:, 3]) - np.maximum(boxes[i, 1], boxes[:, 1]), 0)
    inter = w * h
    suppressed |= inter / (areas[i] + areas - inter) > threshold
  return np.array(keep)


def kept(out):
  indices, valid = np.asarray(out.indices), np.asarray(out.valid)
  n = int(valid.sum())
  assert valid[:n].all() and not valid[n:].any(), 'valid slots must come first'
  assert (indices[n:] == -1).all()
  assert int(out.num_kept) == n
  return indices[:n]


def test_hand_example_and_strict_threshold():
  boxes = jnp.array([[0., 0., 4., 1.], [0., 0., 2., 1.], [0., 0., 4., 1.1], [10., 10., 11., 11.]])
  scores = jnp.array([0.9, 0.8, 0.7, 0.1])
  # IoU(0, 1) = 0.5 exactly: not > 0.5, so box 1 survives; box 2 overlaps box 0 by 0.91.
  np.testing.assert_array_equal(kept(nms(boxes, scores, 0.5, 4)), [0, 1, 3])
  np.testing.assert_array_equal(kept(nms(boxes, scores, 0.49, 4)), [0, 3])


@pytest.mark.parametrize('threshold', [0.3, 0.5, 0.7])
def test_matches_torchvision_on_distinct_scores(threshold):
  torch = pytest.importorskip('torch')
  torchvision = pytest.importorskip('torchvision')
  rng = np.random.default_rng(int(threshold * 10))
  boxes = random_boxes(rng, 300)
  scores = rng.permutation(300).astype(np.float32) / 300
  expected = torchvision.ops.nms(torch.tensor(boxes), torch.tensor(scores), threshold).numpy()
  assert 10 < len(expected) < 300
  np.testing.assert_array_equal(kept(nms(boxes, scores, threshold, 300)), expected)
  # Fewer slots than kept boxes: the highest-scoring ones, torchvision's keep[:k].
  np.testing.assert_array_equal(kept(nms(boxes, scores, threshold, 7)), expected[:7])


def test_ties_follow_index_order_like_torchvision():
  """Tied scores rank by index (stable sort), as torchvision 0.29's CPU kernel."""
  torch = pytest.importorskip('torch')
  torchvision = pytest.importorskip('torchvision')
  rng = np.random.default_rng(3)
  boxes = random_boxes(rng, 200, extent=30.0)
  scores = rng.integers(0, 2, size=200).astype(np.float32)  # two score values
  ours = kept(nms(boxes, scores, 0.3, 200))
  np.testing.assert_array_equal(ours, reference_nms(boxes, scores, 0.3))
  np.testing.assert_array_equal(
      ours, torchvision.ops.nms(torch.tensor(boxes), torch.tensor(scores), 0.3).numpy())
  # The rule decides here: 50 identical boxes, equal scores -> the first survives.
  same = np.tile(np.array([[0., 0., 10., 10.]], np.float32), (50, 1))
  np.testing.assert_array_equal(kept(nms(same, np.zeros(50, np.float32), 0.5, 3)), [0])
  np.testing.assert_array_equal(
      torchvision.ops.nms(torch.tensor(same), torch.zeros(50), 0.5).numpy(), [0])


def test_valid_mask_drops_padding():
  torch = pytest.importorskip('torch')
  torchvision = pytest.importorskip('torchvision')
  rng = np.random.default_rng(4)
  boxes = random_boxes(rng, 100)
  scores = rng.uniform(size=100).astype(np.float32)
  valid = rng.uniform(size=100) < 0.6
  subset = np.nonzero(valid)[0]
  expected = subset[torchvision.ops.nms(torch.tensor(boxes[subset]),
                                        torch.tensor(scores[subset]), 0.5).numpy()]
  np.testing.assert_array_equal(kept(nms(boxes, scores, 0.5, 100, valid=valid)), expected)
  none = nms(boxes, scores, 0.5, 5, valid=np.zeros(100, bool))
  assert not np.asarray(none.valid).any() and (np.asarray(none.indices) == -1).all()


def test_vmap_over_images_and_traced_threshold():
  rng = np.random.default_rng(5)
  boxes = np.stack([random_boxes(rng, 80) for _ in range(3)])
  scores = rng.uniform(size=(3, 80)).astype(np.float32)
  thresholds = np.array([0.3, 0.5, 0.7], np.float32)
  out = jax.jit(jax.vmap(functools.partial(nms, max_output_size=40)))(boxes, scores, thresholds)
  for b in range(3):
    single = nms(boxes[b], scores[b], float(thresholds[b]), 40)
    np.testing.assert_array_equal(out.indices[b], single.indices)
    np.testing.assert_array_equal(out.valid[b], single.valid)
    np.testing.assert_array_equal(kept(single), reference_nms(boxes[b], scores[b],
                                                              thresholds[b])[:40])


@pytest.mark.parametrize('num_boxes', [300, 1200])  # torchvision: offset trick / per-class loop
def test_batched_nms_matches_torchvision(num_boxes):
  torch = pytest.importorskip('torch')
  torchvision = pytest.importorskip('torchvision')
  rng = np.random.default_rng(num_boxes)
  boxes = random_boxes(rng, num_boxes)
  scores = rng.permutation(num_boxes).astype(np.float32) / num_boxes
  classes = rng.integers(0, 5, size=num_boxes)
  expected = torchvision.ops.batched_nms(torch.tensor(boxes), torch.tensor(scores),
                                         torch.tensor(classes), 0.5).numpy()
  ours = kept(batched_nms(boxes, scores, classes, 0.5, num_boxes))
  np.testing.assert_array_equal(ours, expected)
  # Class-aware keeps more than class-agnostic, and within a class it is plain NMS.
  assert len(ours) > int(nms(boxes, scores, 0.5, num_boxes).num_kept)
  members = np.nonzero(classes == 2)[0]
  np.testing.assert_array_equal(ours[classes[ours] == 2],
                                members[reference_nms(boxes[members], scores[members], 0.5)])


def test_empty_input_and_bad_arguments():
  out = nms(jnp.zeros((0, 4)), jnp.zeros((0,)), 0.5, 3)
  np.testing.assert_array_equal(out.indices, [-1, -1, -1])
  with pytest.raises(ValueError, match='max_output_size=0'):
    nms(jnp.zeros((2, 4)), jnp.zeros((2,)), 0.5, 0)
  with pytest.raises(ValueError, match=r'boxes must have shape \[N, 4\]'):
    nms(jnp.zeros((2, 5)), jnp.zeros((2,)), 0.5, 2)
  with pytest.raises(ValueError, match='idxs'):
    batched_nms(jnp.zeros((2, 4)), jnp.zeros((2,)), jnp.zeros((3,), int), 0.5, 2)
