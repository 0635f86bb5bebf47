"""Tests for segjax.models.detection.matching: Matcher, sampler, anchor/proposal/mask targets."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from segjax.models.detection import matching
from segjax.models.detection.boxes import BoxCoder, box_iou


def random_boxes(rng, n, extent=100.0, max_size=40.0):
  xy = rng.uniform(0, extent, size=(n, 2))
  wh = rng.uniform(2, max_size, size=(n, 2))
  return np.concatenate([xy, xy + wh], axis=1).astype(np.float32)


def boxes_around(rng, gt, n_near, n_random):
  """Predictions: n_near jittered copies of ground-truth boxes, then n_random anywhere."""
  near = gt[rng.integers(0, len(gt), size=n_near)] + rng.normal(scale=4.0, size=(n_near, 4))
  return np.concatenate([near, random_boxes(rng, n_random)]).astype(np.float32)


def torch_matcher(high, low, allow_low_quality):
  pytest.importorskip('torch')
  pytest.importorskip('torchvision')
  from torchvision.models.detection import _utils as det_utils
  return det_utils.Matcher(high, low, allow_low_quality_matches=allow_low_quality)


@pytest.mark.parametrize('high,low,allow', [(0.7, 0.3, True), (0.5, 0.5, False),
                                            (0.6, 0.2, False)])
def test_matcher_matches_torchvision(high, low, allow):
  torch = pytest.importorskip('torch')
  rng = np.random.default_rng(0)
  gt = random_boxes(rng, 6)
  preds = boxes_around(rng, gt, 100, 200)
  preds[7] = gt[2]  # a prediction duplicating a ground truth
  matcher = matching.Matcher(high, low, allow)
  quality = np.asarray(box_iou(jnp.asarray(gt), jnp.asarray(preds)))
  ours = np.asarray(matcher(jnp.asarray(quality)))
  np.testing.assert_array_equal(ours, torch_matcher(high, low, allow)(torch.tensor(quality)))
  assert -1 in ours and (ours >= 0).sum() > 10 and ours[7] == 2
  assert (-2 in ours) == (low < high)  # no 'between' band when the thresholds are equal
  # A ground truth that overlaps nothing: its highest IoU is 0, so with low-quality
  # matches torchvision restores *every* prediction with IoU 0 to it; kept as is.
  gt[5] = [500, 500, 510, 510]
  quality = np.asarray(box_iou(jnp.asarray(gt), jnp.asarray(preds)))
  ours = np.asarray(matcher(jnp.asarray(quality)))
  np.testing.assert_array_equal(ours, torch_matcher(high, low, allow)(torch.tensor(quality)))
  assert (ours >= 0).all() if allow else -1 in ours


def test_matcher_ties_and_padding():
  torch = pytest.importorskip('torch')
  quality = np.array([[0.9, 0.2, 0.4, 0.0],
                      [0.9, 0.4, 0.1, 0.0],
                      [0.1, 0.4, 0.4, 0.0]], np.float32)
  matcher = matching.Matcher(0.7, 0.3, allow_low_quality_matches=True)
  expected = torch_matcher(0.7, 0.3, True)(torch.tensor(quality)).numpy()
  np.testing.assert_array_equal(matcher(jnp.asarray(quality)), expected)
  np.testing.assert_array_equal(expected, [0, 1, 0, -1])  # first gt wins ties
  # Padding: rows / columns of invalid entries change nothing for the valid ones.
  padded = np.zeros((5, 6), np.float32)
  padded[:3, :4] = quality
  padded[3:, :] = 0.95  # garbage in padded ground truth
  gt_valid = np.array([True, True, True, False, False])
  pred_valid = np.array([True] * 4 + [False] * 2)
  out = np.asarray(matcher(jnp.asarray(padded), jnp.asarray(gt_valid), jnp.asarray(pred_valid)))
  np.testing.assert_array_equal(out, [0, 1, 0, -1, -1, -1])
  none = matcher(jnp.asarray(padded), jnp.zeros(5, bool))
  np.testing.assert_array_equal(none, np.full(6, matching.BELOW_LOW_THRESHOLD))


def test_matcher_rejects_inverted_thresholds():
  with pytest.raises(ValueError, match='low_threshold=0.8'):
    matching.Matcher(0.5, 0.8)


@pytest.mark.parametrize('num_pos,num_neg', [(3, 500), (200, 500), (100, 20), (0, 0)])
def test_sampler_counts_and_labels(num_pos, num_neg):
  rng = np.random.default_rng(num_pos + num_neg)
  labels = np.full(1000, -1)
  labels[:num_pos] = rng.integers(1, 5, size=num_pos)  # class ids count as positive
  labels[num_pos:num_pos + num_neg] = 0
  labels = rng.permutation(labels)
  sample = matching.sample_balanced(jax.random.key(0), jnp.asarray(labels), 256, 0.25)
  indices, positive, valid = (np.asarray(a) for a in sample)
  assert indices.shape == positive.shape == valid.shape == (256,)
  expected_pos = min(64, num_pos)
  expected_neg = min(256 - expected_pos, num_neg)
  assert positive.sum() == expected_pos and (valid & ~positive).sum() == expected_neg
  n = expected_pos + expected_neg
  assert valid[:n].all() and not valid[n:].any() and (indices[n:] == -1).all()
  assert positive[:expected_pos].all()
  chosen = indices[:n]
  assert len(set(chosen.tolist())) == n
  assert (labels[chosen[:expected_pos]] >= 1).all() and (labels[chosen[expected_pos:]] == 0).all()
  pos_mask, neg_mask = (np.asarray(m) for m in sample.masks(1000))
  np.testing.assert_array_equal(np.nonzero(pos_mask)[0], np.sort(chosen[:expected_pos]))
  np.testing.assert_array_equal(np.nonzero(neg_mask)[0], np.sort(chosen[expected_pos:]))


def test_sampler_is_random_and_covers_all_candidates():
  labels = jnp.asarray(np.r_[np.ones(40), np.zeros(60), -np.ones(20)].astype(np.int32))
  keys = jax.random.split(jax.random.key(1), 64)
  samples = jax.vmap(lambda k: matching.sample_balanced(k, labels, 16, 0.5))(keys)
  chosen = np.asarray(samples.indices)
  assert len({tuple(sorted(c)) for c in chosen}) > 60  # different subsets per key
  counts = np.bincount(chosen.ravel(), minlength=120)
  assert (counts[:100] > 0).all() and (counts[100:] == 0).all()
  # Each positive is drawn with probability 8/40, each negative 8/60.
  assert abs(counts[:40].mean() - 64 * 8 / 40) < 1.0
  assert abs(counts[40:100].mean() - 64 * 8 / 60) < 1.0


def test_sampler_bad_arguments():
  with pytest.raises(ValueError, match='positive_fraction=1.5'):
    matching.sample_balanced(jax.random.key(0), jnp.zeros(4, int), 2, 1.5)
  with pytest.raises(ValueError, match='batch_size_per_image=0'):
    matching.sample_balanced(jax.random.key(0), jnp.zeros(4, int), 0, 0.5)


def test_anchor_targets_match_torchvision_rpn():
  torch = pytest.importorskip('torch')
  pytest.importorskip('torchvision')
  from torchvision.models.detection.rpn import RegionProposalNetwork
  rpn = RegionProposalNetwork(None, None, 0.7, 0.3, 256, 0.5, dict(training=10, testing=10),
                              dict(training=10, testing=10), 0.7)
  rng = np.random.default_rng(2)
  gt = random_boxes(rng, 5)
  anchors = boxes_around(rng, gt, 100, 300)
  labels, matched = rpn.assign_targets_to_anchors([torch.tensor(anchors)],
                                                  [{'boxes': torch.tensor(gt)}])
  padded = np.concatenate([gt, np.zeros((3, 4), np.float32)])
  gt_valid = np.arange(8) < 5
  targets = matching.assign_anchor_targets(jnp.asarray(anchors), jnp.asarray(padded),
                                           jnp.asarray(gt_valid), matching.Matcher(0.7, 0.3, True))
  np.testing.assert_array_equal(targets.labels, labels[0].numpy())
  fg = labels[0].numpy() == 1
  np.testing.assert_array_equal(np.asarray(targets.matched_gt_boxes)[fg], matched[0].numpy()[fg])
  assert {-1.0, 0.0, 1.0} == set(np.asarray(targets.labels).tolist())
  # No ground truth: all background, as torchvision's empty-target branch.
  empty = matching.assign_anchor_targets(jnp.asarray(anchors), jnp.asarray(padded),
                                         jnp.zeros(8, bool), matching.Matcher(0.7, 0.3, True))
  np.testing.assert_array_equal(empty.labels, np.zeros(400))


def test_proposal_targets_match_torchvision_roi_heads():
  torch = pytest.importorskip('torch')
  pytest.importorskip('torchvision')
  from torchvision.models.detection.roi_heads import RoIHeads
  heads = RoIHeads(None, None, None, 0.5, 0.5, 512, 0.25, None, 0.05, 0.5, 100)
  rng = np.random.default_rng(3)
  gt = random_boxes(rng, 4)
  proposals = boxes_around(rng, gt, 100, 200)
  gt_labels = np.array([3, 1, 7, 2])
  matched_idxs, labels = heads.assign_targets_to_proposals(
      [torch.tensor(proposals)], [torch.tensor(gt)], [torch.tensor(gt_labels)])
  padded = np.concatenate([gt, np.full((2, 4), 50.0, np.float32)])
  padded_labels = np.r_[gt_labels, [9, 9]]
  targets = matching.assign_proposal_targets(
      jnp.asarray(proposals), jnp.asarray(padded), jnp.asarray(padded_labels),
      jnp.asarray(np.arange(6) < 4), matching.Matcher(0.5, 0.5, False))
  np.testing.assert_array_equal(targets.labels, labels[0].numpy())
  np.testing.assert_array_equal(targets.matched_idxs, matched_idxs[0].numpy())
  assert (np.asarray(targets.labels) > 0).sum() > 5
  np.testing.assert_array_equal(targets.matched_gt_boxes, padded[np.asarray(targets.matched_idxs)])


def test_regression_targets_are_zero_and_finite_off_the_mask():
  rng = np.random.default_rng(4)
  ref, gt = random_boxes(rng, 6), random_boxes(rng, 6)
  ref[4:] = 0.0  # padded reference boxes
  valid = np.array([True, False, True, True, False, False])
  coder = BoxCoder((10.0, 10.0, 5.0, 5.0))
  out = np.asarray(matching.encode_regression_targets(coder, jnp.asarray(gt), jnp.asarray(ref),
                                                      jnp.asarray(valid)))
  assert np.isfinite(out).all()
  np.testing.assert_array_equal(out[~valid], 0.0)
  np.testing.assert_allclose(out[valid], coder.encode(jnp.asarray(gt), jnp.asarray(ref))[valid],
                             rtol=1e-6)


@pytest.mark.parametrize('impl', ['gather', 'matmul'])
def test_mask_targets_match_torchvision(impl):
  torch = pytest.importorskip('torch')
  pytest.importorskip('torchvision')
  from torchvision.models.detection.roi_heads import project_masks_on_boxes
  rng = np.random.default_rng(5)
  height, width = 40, 56
  masks = np.zeros((3, height, width), np.uint8)
  for m, (y, x, h, w) in zip(masks, [(2, 3, 20, 30), (15, 20, 24, 30), (0, 0, 40, 10)]):
    m[y:y + h, x:x + w] = rng.uniform(size=(h, w)) < 0.8
  boxes = random_boxes(rng, 20, extent=35.0, max_size=30.0)
  boxes[:, 2:] = np.minimum(boxes[:, 2:], [width, height])  # inside the image
  matched = rng.integers(0, 3, size=20)
  expected = project_masks_on_boxes(torch.tensor(masks), torch.tensor(boxes),
                                    torch.tensor(matched), 14).numpy()
  out = matching.project_masks_on_boxes(jnp.asarray(masks), jnp.asarray(boxes),
                                        jnp.asarray(matched), 14, impl=impl)
  assert out.shape == (20, 14, 14)
  np.testing.assert_allclose(out, expected, atol=1e-5, rtol=0)
  assert 0.2 < (expected > 0.5).mean() < 0.9
