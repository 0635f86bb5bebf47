"""Tests for segjax.models.detection.multiscale_roi_align vs torchvision's MultiScaleRoIAlign."""

from collections import OrderedDict

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from segjax.models.detection.multiscale_roi_align import (infer_scale, level_range, map_levels,
                                                          multiscale_roi_align)

B, R, C = 2, 24, 3


def pyramid(rng, image_shape, strides=(4, 8, 16, 32), dtype=np.float32):
  h, w = image_shape
  return [rng.normal(size=(B, h // s, w // s, C)).astype(dtype) for s in strides]


def log_uniform_boxes(rng, image_shape, min_size, max_size, dtype=np.float32):
  h, w = image_shape
  size = np.exp(rng.uniform(np.log(min_size), np.log(max_size), size=(B, R, 2)))
  xy = rng.uniform(0, 1, size=(B, R, 2)) * np.maximum([w, h] - size, 0)
  return np.concatenate([xy, np.minimum(xy + size, [w, h])], axis=-1).astype(dtype)


def torch_multiscale(features, boxes, image_shape, sampling_ratio, canonical_scale=224,
                     grad_out=None):
  torch = pytest.importorskip('torch')
  torchvision = pytest.importorskip('torchvision')
  pooler = torchvision.ops.MultiScaleRoIAlign([str(i) for i in range(len(features))], 7,
                                              sampling_ratio, canonical_scale=canonical_scale)
  x = OrderedDict((str(i), torch.tensor(f).permute(0, 3, 1, 2).contiguous().requires_grad_())
                  for i, f in enumerate(features))
  out = pooler(x, [torch.tensor(b) for b in boxes], [image_shape] * B)
  out = out.permute(0, 2, 3, 1).reshape(B, R, 7, 7, C)
  if grad_out is None:
    return out.detach().numpy()
  out.backward(torch.tensor(grad_out))
  return out.detach().numpy(), [v.grad.permute(0, 2, 3, 1).numpy() for v in x.values()]


def test_level_mapper_matches_torchvision():
  torch = pytest.importorskip('torch')
  pytest.importorskip('torchvision')
  from torchvision.ops.poolers import LevelMapper
  rng = np.random.default_rng(0)
  boxes = log_uniform_boxes(rng, (1200, 1200), 4, 1200).reshape(-1, 4)
  # Square boxes exactly on the level boundaries 112, 224, 448 (eps decides).
  edges = np.array([[0, 0, s, s] for s in (56, 111.9, 112, 224, 448, 449)], np.float32)
  boxes = np.concatenate([boxes, edges])
  expected = LevelMapper(2, 5)([torch.tensor(boxes)]).numpy()
  levels = np.asarray(map_levels(jnp.asarray(boxes), 2, 5))
  np.testing.assert_array_equal(levels, expected)
  np.testing.assert_array_equal(levels[-6:], [0, 0, 1, 2, 3, 3])
  assert set(levels.tolist()) == {0, 1, 2, 3}


def test_scale_inference():
  assert infer_scale((200, 334), (800, 1333)) == 0.25
  assert infer_scale((25, 42), (800, 1333)) == 1 / 32
  assert level_range([(64, 80), (32, 40), (16, 20), (8, 10)], (256, 320)) == (
      [0.25, 0.125, 0.0625, 0.03125], 2, 5)
  with pytest.raises(ValueError, match='consecutive FPN levels'):
    level_range([(64, 80), (16, 20)], (256, 320))


@pytest.mark.parametrize('impl', ['gather', 'matmul'])
def test_matches_torchvision_float32(impl):
  # canonical_scale 28 (levels switch at 14, 28, 56 px) keeps the image small,
  # so float32 coordinates stay accurate to 1e-5 on every level.
  rng = np.random.default_rng(1)
  image_shape = (64, 96)
  features = pyramid(rng, image_shape)
  boxes = log_uniform_boxes(rng, image_shape, 3, 96)
  grad_out = rng.normal(size=(B, R, 7, 7, C)).astype(np.float32)
  expected, expected_grads = torch_multiscale(features, boxes, image_shape, 2,
                                              canonical_scale=28, grad_out=grad_out)
  levels = np.asarray(map_levels(jnp.asarray(boxes), 2, 5, canonical_scale=28))
  assert len(set(levels.ravel().tolist())) == 4, 'every level should be used'
  fn = lambda fs: multiscale_roi_align(fs, jnp.asarray(boxes), image_shape, 7, sampling_ratio=2,
                                       canonical_scale=28, impl=impl)
  out, vjp = jax.vjp(fn, [jnp.asarray(f) for f in features])
  np.testing.assert_allclose(out, expected, atol=1e-5, rtol=0)
  for grad, expected_grad in zip(vjp(jnp.asarray(grad_out))[0], expected_grads):
    np.testing.assert_allclose(grad, expected_grad, atol=1e-5, rtol=0)


@pytest.mark.parametrize('sampling_ratio', [2, -1])
@pytest.mark.parametrize('impl', ['gather', 'matmul'])
def test_matches_torchvision_float64_default_levels(sampling_ratio, impl):
  with jax.enable_x64(True):
    rng = np.random.default_rng(2)
    image_shape = (256, 320)
    features = pyramid(rng, image_shape, dtype=np.float64)
    boxes = log_uniform_boxes(rng, image_shape, 8, 320, dtype=np.float64)
    expected = torch_multiscale(features, boxes, image_shape, sampling_ratio)
    out = multiscale_roi_align([jnp.asarray(f) for f in features], jnp.asarray(boxes),
                               image_shape, 7, sampling_ratio=sampling_ratio, impl=impl)
    np.testing.assert_allclose(out, expected, atol=1e-10, rtol=0)


def test_auto_reads_each_box_on_its_level_only_for_large_pyramids():
  # On CPU, 'auto' with 2x2 samples on a 512x512 image's levels is 'gather': one read
  # per box on its own level, where 'matmul' would pool every box on all four.
  if jax.default_backend() != 'cpu':
    pytest.skip('the cost rule is the CPU one')
  rng = np.random.default_rng(4)

  def ops(image_shape):
    features = [jnp.zeros((1, image_shape[0] // s, image_shape[1] // s, 1)) for s in (4, 8, 16, 32)]
    boxes = jnp.asarray(log_uniform_boxes(rng, image_shape, 8, 256)[:1])
    jaxpr = jax.make_jaxpr(lambda fs: multiscale_roi_align(fs, boxes, image_shape, 7,
                                                           sampling_ratio=2))(features)
    return str(jaxpr)

  large, small = ops((512, 512)), ops((64, 64))
  assert 'dot_general' not in large and 'gather' in large
  assert 'dot_general' in small


def test_single_level_is_plain_roi_align():
  rng = np.random.default_rng(3)
  features = pyramid(rng, (64, 96), strides=(8,))
  boxes = log_uniform_boxes(rng, (64, 96), 3, 96)
  expected = torch_multiscale(features, boxes, (64, 96), 2)
  out = multiscale_roi_align([jnp.asarray(features[0])], jnp.asarray(boxes), (64, 96), 7,
                             sampling_ratio=2)
  np.testing.assert_allclose(out, expected, atol=1e-5, rtol=0)


def test_multiscale_roi_pool_matches_torchvision_roi_pool_on_each_box_level():
  """RoIPool arm (Mask R-CNN Table 2c): each box = torchvision's roi_pool on its FPN level."""
  torch = pytest.importorskip('torch')
  torchvision = pytest.importorskip('torchvision')
  from segjax.models.detection.multiscale_roi_align import multiscale_roi_pool
  rng = np.random.default_rng(5)
  image_shape = (128, 96)
  features = pyramid(rng, image_shape)
  boxes = log_uniform_boxes(rng, image_shape, 4, 120)
  out = np.asarray(multiscale_roi_pool([jnp.asarray(f) for f in features], jnp.asarray(boxes),
                                       image_shape, 7, canonical_scale=56))
  levels = np.asarray(map_levels(jnp.asarray(boxes.reshape(-1, 4)), 2, 5,
                                 canonical_scale=56)).reshape(B, R)
  assert len(set(levels.ravel().tolist())) >= 3  # the boxes span several levels
  expected = np.zeros_like(out)
  for level, (f, stride) in enumerate(zip(features, (4, 8, 16, 32))):
    rois = [torch.tensor(b) for b in boxes]
    pooled = torchvision.ops.roi_pool(torch.tensor(f).permute(0, 3, 1, 2), rois, 7, 1.0 / stride)
    pooled = pooled.permute(0, 2, 3, 1).numpy().reshape(B, R, 7, 7, C)
    expected = np.where((levels == level)[..., None, None, None], pooled, expected)
  np.testing.assert_allclose(out, expected, rtol=0, atol=0)
