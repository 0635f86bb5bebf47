"""Tests for segjax.models.detection.roi_align: values and input-gradients equal to torchvision's."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from segjax.models.detection import roi_align as roi_align_lib
from segjax.models.detection.roi_align import roi_align, roi_align_indexed

B, H, W, C, R = 2, 10, 12, 3, 7


def make_inputs(seed, spatial_scale, inside=True, dtype=np.float32):
  """Features [B, H, W, C] and boxes [B, R, 4] in image pixels.

  inside=True keeps boxes within the image (the exact range of the default
  adaptive bound); otherwise boxes spill past every border and some are
  degenerate (x2 < x1).
  """
  rng = np.random.default_rng(seed)
  features = rng.normal(size=(B, H, W, C)).astype(dtype)
  image_h, image_w = H / spatial_scale, W / spatial_scale
  if inside:
    a = rng.uniform(0, 1, size=(B, R, 2, 2)) * [image_w, image_h]
    boxes = np.concatenate([a.min(axis=2), a.max(axis=2)], axis=-1)
  else:
    xy = rng.uniform(-0.3, 1.1, size=(B, R, 2)) * [image_w, image_h]
    wh = rng.uniform(-0.1, 0.6, size=(B, R, 2)) * [image_w, image_h]
    boxes = np.concatenate([xy, xy + wh], axis=-1)
  return features, boxes.astype(dtype)


def torch_roi_align(features, boxes, output_size, spatial_scale, sampling_ratio, aligned,
                    grad_out):
  """torchvision's output [B, R, P, Q, C] and d(sum(out * grad_out))/d(features)."""
  torch = pytest.importorskip('torch')
  torchvision = pytest.importorskip('torchvision')
  x = torch.tensor(features).permute(0, 3, 1, 2).contiguous().requires_grad_()
  flat = boxes.reshape(-1, 4)
  rois = np.concatenate([np.repeat(np.arange(B), R)[:, None], flat], axis=1)
  rois = torch.tensor(rois.astype(features.dtype))
  out = torchvision.ops.roi_align(x, rois, output_size, spatial_scale, sampling_ratio, aligned)
  out = out.permute(0, 2, 3, 1).reshape(grad_out.shape)
  out.backward(torch.tensor(grad_out))
  return out.detach().numpy(), x.grad.permute(0, 2, 3, 1).numpy()


def ours_and_grad(features, boxes, grad_out, **kwargs):
  fn = lambda f: roi_align(f, jnp.asarray(boxes), (4, 3), **kwargs)
  out, vjp = jax.vjp(fn, jnp.asarray(features))
  return np.asarray(out), np.asarray(vjp(jnp.asarray(grad_out))[0])


@pytest.mark.parametrize('impl', ['gather', 'matmul'])
@pytest.mark.parametrize('spatial_scale', [0.25, 0.5])
@pytest.mark.parametrize('sampling_ratio', [2, -1])
@pytest.mark.parametrize('aligned', [False, True])
def test_matches_torchvision(aligned, sampling_ratio, spatial_scale, impl):
  features, boxes = make_inputs(0, spatial_scale, inside=sampling_ratio < 0)
  grad_out = np.random.default_rng(1).normal(size=(B, R, 4, 3, C)).astype(np.float32)
  expected, expected_grad = torch_roi_align(features, boxes, (4, 3), spatial_scale,
                                            sampling_ratio, aligned, grad_out)
  out, grad = ours_and_grad(features, boxes, grad_out, spatial_scale=spatial_scale,
                            sampling_ratio=sampling_ratio, aligned=aligned, impl=impl)
  np.testing.assert_allclose(out, expected, atol=1e-5, rtol=0)
  np.testing.assert_allclose(grad, expected_grad, atol=1e-5, rtol=0)
  assert np.abs(expected).max() > 0.1 and np.abs(expected_grad).max() > 0.1


@pytest.mark.parametrize('impl', ['gather', 'matmul'])
@pytest.mark.parametrize('sampling_ratio', [0, 1, 3])
def test_other_sampling_ratios_and_boxes_outside(sampling_ratio, impl):
  # Boxes past the borders and degenerate ones; adaptive needs an explicit bound
  # here (boxes up to 0.6 of the image per side + spill: 4 samples per side).
  features, boxes = make_inputs(2, 0.5, inside=False)
  grad_out = np.random.default_rng(3).normal(size=(B, R, 4, 3, C)).astype(np.float32)
  expected, expected_grad = torch_roi_align(features, boxes, (4, 3), 0.5, sampling_ratio,
                                            False, grad_out)
  out, grad = ours_and_grad(features, boxes, grad_out, spatial_scale=0.5,
                            sampling_ratio=sampling_ratio, impl=impl, max_sampling_ratio=4)
  np.testing.assert_allclose(out, expected, atol=1e-5, rtol=0)
  np.testing.assert_allclose(grad, expected_grad, atol=1e-5, rtol=0)


@pytest.mark.parametrize('impl', ['gather', 'matmul'])
def test_float64_parity_is_tight(impl):
  """In float64 the two agree to rounding: the formula is the same, not just close."""
  with jax.enable_x64(True):
    features, boxes = make_inputs(4, 0.25, inside=False, dtype=np.float64)
    grad_out = np.random.default_rng(5).normal(size=(B, R, 4, 3, C))
    for aligned in (False, True):
      expected, expected_grad = torch_roi_align(features, boxes, (4, 3), 0.25, -1, aligned,
                                                grad_out)
      out, grad = ours_and_grad(features, boxes, grad_out, spatial_scale=0.25,
                                sampling_ratio=-1, aligned=aligned, impl=impl,
                                max_sampling_ratio=8)
      assert out.dtype == np.float64
      np.testing.assert_allclose(out, expected, atol=1e-12, rtol=0)
      np.testing.assert_allclose(grad, expected_grad, atol=1e-12, rtol=0)


def test_adaptive_bound_clamps_only_boxes_larger_than_the_map():
  features, boxes = make_inputs(6, 0.5, inside=False)
  boxes[:, :3] = boxes[:, :3] * 2.5 - 10  # up to 3 map sizes: some need > 3 x 4 samples
  grad_out = np.zeros((B, R, 4, 3, C), np.float32)
  expected, _ = torch_roi_align(features, boxes, (4, 3), 0.5, -1, False, grad_out)
  out, _ = ours_and_grad(features, boxes, grad_out, spatial_scale=0.5, sampling_ratio=-1,
                         impl='gather')
  # Default bound ceil(10/4) x ceil(12/3) = 3 x 4 samples: boxes needing more differ.
  heights = np.maximum((boxes[..., 3] - boxes[..., 1]) * 0.5, 1)
  widths = np.maximum((boxes[..., 2] - boxes[..., 0]) * 0.5, 1)
  within = (np.ceil(heights / 4) <= 3) & (np.ceil(widths / 3) <= 4)
  assert within.any() and not within.all()
  np.testing.assert_allclose(out[within], expected[within], atol=1e-5, rtol=0)
  assert np.abs(out[~within] - expected[~within]).max() > 1e-3


@pytest.mark.parametrize('impl', ['gather', 'matmul'])
def test_indexed_layout_matches_torchvision(impl):
  torch = pytest.importorskip('torch')
  torchvision = pytest.importorskip('torchvision')
  rng = np.random.default_rng(7)
  features, boxes = make_inputs(7, 0.5)
  flat = boxes.reshape(-1, 4)
  box_indices = rng.integers(0, B, size=len(flat))
  rois = np.concatenate([box_indices[:, None], flat], axis=1).astype(np.float32)
  expected = torchvision.ops.roi_align(torch.tensor(features).permute(0, 3, 1, 2),
                                       torch.tensor(rois), (5, 5), 0.5, 2, True)
  out = roi_align_indexed(jnp.asarray(features), jnp.asarray(flat), jnp.asarray(box_indices),
                          5, spatial_scale=0.5, sampling_ratio=2, aligned=True, impl=impl)
  np.testing.assert_allclose(out, expected.permute(0, 2, 3, 1).numpy(), atol=1e-5, rtol=0)


@pytest.mark.parametrize('impl', ['gather', 'matmul'])
def test_gradient_by_finite_differences(impl):
  with jax.enable_x64(True):
    features, boxes = make_inputs(8, 0.5, inside=False, dtype=np.float64)
    fn = lambda f: roi_align(f, jnp.asarray(boxes), 3, spatial_scale=0.5, sampling_ratio=2,
                             aligned=True, impl=impl)
    check_grads(fn, (jnp.asarray(features),), order=2, modes=('rev',), eps=1e-3)


def test_no_gradient_to_boxes_and_works_under_jit():
  features, boxes = make_inputs(9, 0.5)
  fn = jax.jit(lambda f, b: roi_align(f, b, 2, spatial_scale=0.5).sum())
  grad_boxes = jax.grad(fn, argnums=1)(jnp.asarray(features), jnp.asarray(boxes))
  np.testing.assert_array_equal(grad_boxes, np.zeros_like(boxes))


@pytest.mark.parametrize('impl', ['gather', 'matmul'])
def test_adaptive_grid_at_exact_multiples(impl):
  """A 21-pixel box in 7 bins has ceil(21 / 7) = 3 samples per side; 21 * float32(1 / 7)
  rounds to 3.0000002, so a division compiled as a reciprocal multiply would take 4."""
  torch = pytest.importorskip('torch')
  torchvision = pytest.importorskip('torchvision')
  features = np.random.default_rng(10).normal(size=(1, 24, 24, 1)).astype(np.float32)
  boxes = np.array([[[1.0, 2.0, 22.0, 23.0], [0.0, 0.0, 14.0, 21.0]]], np.float32)
  rois = torch.tensor(np.concatenate([np.zeros((2, 1), np.float32), boxes[0]], axis=1))
  expected = torchvision.ops.roi_align(torch.tensor(features).permute(0, 3, 1, 2), rois, 7,
                                       1.0, -1, False).permute(0, 2, 3, 1).numpy()
  out = roi_align(jnp.asarray(features), jnp.asarray(boxes), 7, sampling_ratio=-1, impl=impl)
  np.testing.assert_allclose(out[0], expected, atol=1e-5, rtol=0)


def test_constant_map_gives_the_constant():
  # Every sample of a box inside the map interpolates the same value.
  features = jnp.full((1, 8, 8, 2), 3.0)
  boxes = jnp.array([[[1.0, 2.0, 7.0, 5.0], [0.0, 0.0, 8.0, 8.0]]])
  for impl in ('gather', 'matmul'):
    np.testing.assert_allclose(roi_align(features, boxes, 2, aligned=True, impl=impl), 3.0,
                               rtol=1e-6)


def test_bad_arguments_name_the_value_and_choices():
  features, boxes = jnp.zeros((1, 4, 4, 1)), jnp.zeros((1, 2, 4))
  with pytest.raises(ValueError, match=r"impl='fast'.*'gather', 'matmul'"):
    roi_align(features, boxes, 2, impl='fast')
  with pytest.raises(ValueError, match=r'sampling_ratio=-2'):
    roi_align(features, boxes, 2, sampling_ratio=-2)
  with pytest.raises(ValueError, match=r'sampling_ratio=1.5'):
    roi_align(features, boxes, 2, sampling_ratio=1.5)
  with pytest.raises(ValueError, match='spatial_scale=0'):
    roi_align(features, boxes, 2, spatial_scale=0)
  with pytest.raises(ValueError, match='output_size'):
    roi_align(features, boxes, (2, 0))
  with pytest.raises(ValueError, match='max_sampling_ratio'):
    roi_align(features, boxes, 2, max_sampling_ratio=0)
  with pytest.raises(ValueError, match=r'boxes must have shape \[B=1, R, 4\]'):
    roi_align(features, jnp.zeros((2, 4)), 2)
  with pytest.raises(ValueError, match='NHWC'):
    roi_align(jnp.zeros((4, 4, 1)), boxes, 2)


@pytest.mark.parametrize('impl', ['gather', 'matmul'])
def test_no_boxes(impl):
  # torchvision returns an empty [0, C, P, Q] for no boxes; here [B, 0, P, Q, C].
  features = jnp.ones((2, 8, 8, 3))
  boxes = jnp.zeros((2, 0, 4))
  fn = lambda f: roi_align(f, boxes, (4, 3), sampling_ratio=2, impl=impl)
  assert fn(features).shape == (2, 0, 4, 3, 3)
  grad = jax.grad(lambda f: fn(f).sum())(features)
  assert grad.shape == features.shape and not np.any(np.asarray(grad))


def test_auto_impl_choice():
  assert roi_align_lib.resolve_impl('gather', (9, 9)) == 'gather'
  if jax.default_backend() == 'cpu':
    assert roi_align_lib.resolve_impl('auto', (1, 1)) == 'gather'
    assert roi_align_lib.resolve_impl('auto', (2, 2)) == 'matmul'
    assert roi_align_lib.resolve_impl('auto', (8, 8)) == 'matmul'


def test_auto_impl_weighs_map_size_on_cpu():
  if jax.default_backend() != 'cpu':
    pytest.skip('the cost rule is the CPU one')
  resolve = roi_align_lib.resolve_impl
  # Per box and channel, 7x7 bins, 2x2 samples: 'gather' reads 49 * 4 * 4 = 784
  # neighbours (x 8 = 6,272). 'matmul' on a 64x64 map: 7*64*64 + 49*64 = 31,808.
  assert resolve('auto', (2, 2), (7, 7), [(64, 64)]) == 'gather'
  # 4x4 samples: 3,136 reads (x 8 = 25,088), still below the matmuls.
  assert resolve('auto', (4, 4), (7, 7), [(64, 64)]) == 'gather'
  # A 16x16 map: 7*16*16 + 49*16 = 2,576 < 6,272.
  assert resolve('auto', (2, 2), (7, 7), [(16, 16)]) == 'matmul'
  # FPN levels of a 512x512 image: 7 * 21,760 + 49 * 240 = 164,080, every box on every level.
  assert resolve('auto', (2, 2), (7, 7), [(128, 128), (64, 64), (32, 32), (16, 16)]) == 'gather'
  # The levels of a 64x64 image: 7 * 340 + 49 * 30 = 3,850.
  assert resolve('auto', (2, 2), (7, 7), [(16, 16), (8, 8), (4, 4), (2, 2)]) == 'matmul'
  # Adaptive sampling on 64x64 (10x10 samples): 49 * 400 * 8 reads outweigh the matmuls.
  assert resolve('auto', (10, 10), (7, 7), [(64, 64)]) == 'matmul'
  # An explicit choice is kept.
  assert resolve('matmul', (2, 2), (7, 7), [(128, 128)]) == 'matmul'
