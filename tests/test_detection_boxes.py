"""Tests for segjax.models.detection.boxes: IoU, clipping, small boxes, BoxCoder."""

import math

import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from segjax.models.detection import boxes as box_ops


def random_boxes(rng, n, low=0.0, high=100.0, min_size=1.0, max_size=50.0):
  xy = rng.uniform(low, high, size=(n, 2))
  wh = rng.uniform(min_size, max_size, size=(n, 2))
  return np.concatenate([xy, xy + wh], axis=1).astype(np.float32)


def test_iou_hand_computed():
  a = jnp.array([[0., 0., 2., 2.], [0., 0., 4., 1.]])
  b = jnp.array([[1., 1., 3., 3.], [0., 0., 2., 1.], [5., 5., 6., 6.]])
  np.testing.assert_allclose(box_ops.box_iou(a, b), [[1 / 7, 0.5, 0], [0, 0.5, 0]], rtol=1e-6)
  np.testing.assert_allclose(box_ops.box_area(a), [4, 4])


def test_iou_of_empty_boxes_is_zero_not_nan():
  zeros = jnp.zeros((2, 4))
  iou = box_ops.box_iou(zeros, jnp.array([[0., 0., 1., 1.]]))
  np.testing.assert_array_equal(box_ops.box_iou(zeros, zeros), np.zeros((2, 2)))
  np.testing.assert_array_equal(iou, np.zeros((2, 1)))
  grad = jax.grad(lambda b: box_ops.box_iou(b, zeros).sum())(zeros)
  assert np.isfinite(np.asarray(grad)).all()


def test_iou_area_clip_small_match_torchvision():
  torch = pytest.importorskip('torch')
  torchvision = pytest.importorskip('torchvision')
  rng = np.random.default_rng(0)
  a, b = random_boxes(rng, 30, -20, 120), random_boxes(rng, 40, -20, 120, 0.0, 60.0)
  np.testing.assert_allclose(box_ops.box_iou(jnp.asarray(a), jnp.asarray(b)),
                             torchvision.ops.box_iou(torch.tensor(a), torch.tensor(b)).numpy(),
                             rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(box_ops.box_area(jnp.asarray(b)),
                             torchvision.ops.box_area(torch.tensor(b)).numpy(), rtol=1e-6)
  np.testing.assert_array_equal(
      box_ops.clip_boxes_to_image(jnp.asarray(a), (70, 90)),
      torchvision.ops.clip_boxes_to_image(torch.tensor(a), (70, 90)).numpy())
  keep = np.asarray(box_ops.remove_small_boxes(jnp.asarray(b), 20.0))
  np.testing.assert_array_equal(np.nonzero(keep)[0],
                                torchvision.ops.remove_small_boxes(torch.tensor(b), 20.0).numpy())
  assert 0 < keep.sum() < len(keep)


def test_clip_with_traced_image_size():
  clip = jax.jit(box_ops.clip_boxes_to_image)
  out = clip(jnp.array([[-5., 2., 50., 70.]]), jnp.array([60, 40]))
  np.testing.assert_array_equal(out, [[0., 2., 40., 60.]])


box_strategy = st.tuples(
    st.floats(-500, 500), st.floats(-500, 500), st.floats(0.5, 300), st.floats(0.5, 300)
).map(lambda t: [t[0], t[1], t[0] + t[2], t[1] + t[3]])
boxes_strategy = st.lists(box_strategy, min_size=6, max_size=6).map(
    lambda b: np.asarray(b, np.float32))

_iou = jax.jit(box_ops.box_iou)


@hypothesis.settings(max_examples=60, deadline=None)
@hypothesis.given(boxes_strategy, boxes_strategy)
def test_iou_properties(a, b):
  ab = np.asarray(_iou(a, b))
  ba = np.asarray(_iou(b, a))
  np.testing.assert_array_equal(ab, ba.T)  # same float operations either way round
  assert (ab >= 0).all() and (ab <= 1).all()
  np.testing.assert_allclose(np.diag(np.asarray(_iou(a, a))), 1.0, rtol=1e-6)


def test_box_coder_matches_torchvision():
  torch = pytest.importorskip('torch')
  pytest.importorskip('torchvision')
  from torchvision.models.detection import _utils as det_utils
  rng = np.random.default_rng(1)
  proposals = random_boxes(rng, 50)
  gt = random_boxes(rng, 50)
  for weights in [(1.0, 1.0, 1.0, 1.0), (10.0, 10.0, 5.0, 5.0)]:
    coder = box_ops.BoxCoder(weights)
    ref = det_utils.BoxCoder(weights)
    deltas = np.asarray(coder.encode(jnp.asarray(gt), jnp.asarray(proposals)))
    np.testing.assert_allclose(
        deltas, ref.encode_single(torch.tensor(gt), torch.tensor(proposals)).numpy(),
        rtol=1e-5, atol=1e-6)
    # Class-specific deltas [N, K * 4], some beyond bbox_xform_clip.
    codes = rng.normal(scale=2.0, size=(50, 3 * 4)).astype(np.float32)
    codes[:5, 2] = 50.0
    decoded = coder.decode(jnp.asarray(codes).reshape(50, 3, 4), jnp.asarray(proposals)[:, None])
    expected = ref.decode_single(torch.tensor(codes), torch.tensor(proposals)).numpy()
    np.testing.assert_allclose(np.asarray(decoded).reshape(50, 12), expected, rtol=1e-5,
                               atol=1e-3)


def test_box_coder_clip_value_and_hand_example():
  assert box_ops.BoxCoder().bbox_xform_clip == pytest.approx(math.log(1000 / 16))
  coder = box_ops.BoxCoder((10.0, 10.0, 5.0, 5.0))
  # Proposal centred at (5, 5), 10x10; gt centred at (6, 5), 20x10.
  deltas = coder.encode(jnp.array([[-4., 0., 16., 10.]]), jnp.array([[0., 0., 10., 10.]]))
  np.testing.assert_allclose(deltas, [[1.0, 0.0, 5 * math.log(2), 0.0]], rtol=1e-6)


reference_strategy = st.tuples(
    st.floats(-200, 200), st.floats(-200, 200), st.floats(4, 300), st.floats(4, 300))
gt_strategy = st.tuples(
    st.floats(-2, 2), st.floats(-2, 2), st.floats(-2.5, 2.5), st.floats(-2.5, 2.5))


@hypothesis.settings(max_examples=60, deadline=None)
@hypothesis.given(st.lists(st.tuples(reference_strategy, gt_strategy), min_size=4, max_size=4),
                  st.sampled_from([(1.0, 1.0, 1.0, 1.0), (10.0, 10.0, 5.0, 5.0)]))
def test_box_coder_round_trip(pairs, weights):
  coder = box_ops.BoxCoder(weights)
  ref = np.array([[x, y, x + w, y + h] for (x, y, w, h), _ in pairs], np.float32)
  # A ground-truth box around each reference: centre shifted by up to 2 sizes,
  # each side scaled by exp(+-2.5) (inside bbox_xform_clip).
  gt = []
  for (x, y, w, h), (sx, sy, lw, lh) in pairs:
    cx, cy = x + w / 2 + sx * w, y + h / 2 + sy * h
    gw, gh = w * math.exp(lw), h * math.exp(lh)
    gt.append([cx - gw / 2, cy - gh / 2, cx + gw / 2, cy + gh / 2])
  gt = np.asarray(gt, np.float32)
  back = coder.decode(coder.encode(jnp.asarray(gt), jnp.asarray(ref)), jnp.asarray(ref))
  scale = np.abs(gt).max() + np.abs(ref).max()
  np.testing.assert_allclose(back, gt, atol=1e-5 * scale)


def test_box_coder_rejects_bad_weights():
  with pytest.raises(ValueError, match='weights'):
    box_ops.BoxCoder((1.0, 1.0, 0.0, 1.0))
