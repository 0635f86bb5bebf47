"""Tests for segjax.models.detection.roi_pool: values and gradients equal to torchvision's."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from segjax.models.detection.roi_pool import roi_pool

B, H, W, C, R = 2, 9, 11, 3, 8


def torch_roi_pool(features, boxes, output_size, spatial_scale, grad_out):
  torch = pytest.importorskip('torch')
  torchvision = pytest.importorskip('torchvision')
  x = torch.tensor(features).permute(0, 3, 1, 2).contiguous().requires_grad_()
  rois = np.concatenate([np.repeat(np.arange(B), R)[:, None], boxes.reshape(-1, 4)], axis=1)
  out = torchvision.ops.roi_pool(x, torch.tensor(rois.astype(np.float32)), output_size,
                                 spatial_scale)
  out = out.permute(0, 2, 3, 1).reshape(grad_out.shape)
  out.backward(torch.tensor(grad_out))
  return out.detach().numpy(), x.grad.permute(0, 2, 3, 1).numpy()


@pytest.mark.parametrize('spatial_scale', [0.25, 0.5, 1.0])
def test_matches_torchvision(spatial_scale):
  rng = np.random.default_rng(int(spatial_scale * 4))
  features = rng.normal(size=(B, H, W, C)).astype(np.float32)
  image_w, image_h = W / spatial_scale, H / spatial_scale
  corners = rng.uniform(0, 1, size=(B, R, 2, 2)) * [image_w, image_h]
  boxes = np.concatenate([corners.min(axis=2), corners.max(axis=2)], axis=-1)
  # Coordinates that land on .5 after scaling: C's round goes away from zero.
  boxes[0, 0] = np.array([0.5, 1.5, 2.5, 4.5]) / spatial_scale
  boxes = boxes.astype(np.float32)
  grad_out = rng.normal(size=(B, R, 3, 4, C)).astype(np.float32)
  expected, expected_grad = torch_roi_pool(features, boxes, (3, 4), spatial_scale, grad_out)
  fn = lambda f: roi_pool(f, jnp.asarray(boxes), (3, 4), spatial_scale=spatial_scale)
  out, vjp = jax.vjp(fn, jnp.asarray(features))
  np.testing.assert_array_equal(out, expected)  # max pooling picks, no arithmetic
  np.testing.assert_allclose(vjp(jnp.asarray(grad_out))[0], expected_grad, atol=1e-6)


def test_boxes_outside_the_map_with_explicit_window():
  rng = np.random.default_rng(5)
  features = rng.normal(size=(B, H, W, C)).astype(np.float32)
  xy = rng.uniform(-8, 12, size=(B, R, 2))
  boxes = np.concatenate([xy, xy + rng.uniform(-2, 14, size=(B, R, 2))], -1).astype(np.float32)
  grad_out = np.ones((B, R, 2, 2, C), np.float32)
  expected, expected_grad = torch_roi_pool(features, boxes, (2, 2), 1.0, grad_out)
  fn = lambda f: roi_pool(f, jnp.asarray(boxes), 2, max_bin_size=(H, W))
  out, vjp = jax.vjp(fn, jnp.asarray(features))
  np.testing.assert_array_equal(out, expected)
  np.testing.assert_allclose(vjp(jnp.asarray(grad_out))[0], expected_grad, atol=1e-6)
  assert (expected == 0).any(), 'some bins should be empty (box outside the map)'


def test_bin_edges_at_exact_multiples():
  # A 7-row box in 3 bins: the last bin ends at ceil(3 * float32(7 / 3)) = 7, not 8
  # (a reciprocal-multiply division would give 7.0000005 -> 8).
  features = jnp.arange(100.0).reshape(1, 10, 10, 1)
  boxes = jnp.array([[[0.0, 1.0, 0.0, 7.0]]])  # rows 1..7, column 0
  out = roi_pool(features, boxes, (3, 1))[0, 0, :, 0, 0]
  # Bins span rows [1, 4), [3, 6), [5, 8): maxima at rows 3, 5, 7 of column 0.
  np.testing.assert_array_equal(out, [30.0, 50.0, 70.0])


def test_hand_example():
  features = jnp.arange(16.0).reshape(1, 4, 4, 1)
  boxes = jnp.array([[[0.0, 0.0, 3.0, 3.0]]])  # the whole 4x4 map, 2x2 bins of 2x2 pixels
  np.testing.assert_array_equal(roi_pool(features, boxes, 2)[0, 0, :, :, 0],
                                [[5, 7], [13, 15]])


def test_bad_arguments():
  with pytest.raises(ValueError, match='spatial_scale=-1'):
    roi_pool(jnp.zeros((1, 4, 4, 1)), jnp.zeros((1, 1, 4)), 2, spatial_scale=-1)
  with pytest.raises(ValueError, match='max_bin_size'):
    roi_pool(jnp.zeros((1, 4, 4, 1)), jnp.zeros((1, 1, 4)), 2, max_bin_size=0)
