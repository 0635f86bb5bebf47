"""Tests for segjax.models.detection.anchors: torchvision's AnchorGenerator, number for number."""

import numpy as np
import pytest

from segjax.models.detection import anchors as anchor_lib


def test_cell_anchors_hand_computed():
  # ratio = h / w, area 32**2: w = 32 / sqrt(r), h = 32 * sqrt(r), halves rounded.
  np.testing.assert_array_equal(
      anchor_lib.cell_anchors((32,), (0.5, 1.0, 2.0)),
      [[-23, -11, 23, 11], [-16, -16, 16, 16], [-11, -23, 11, 23]])


def test_grid_order_is_row_then_column_then_anchor():
  cell = np.array([[-1, -1, 1, 1], [-2, -2, 2, 2]], np.float32)
  grid = anchor_lib.grid_anchors(cell, (2, 3), (8, 4))
  assert grid.shape == (2 * 3 * 2, 4)
  # Position (row 1, column 2): centre (x=8, y=8); its second anchor.
  np.testing.assert_array_equal(grid[(1 * 3 + 2) * 2 + 1], [6, 6, 10, 10])


@pytest.mark.parametrize('image_shape,feature_shapes', [
    ((64, 96), [(16, 24), (8, 12), (4, 6), (2, 3), (1, 2)]),
    ((100, 75), [(25, 19), (13, 10), (7, 5), (4, 3), (2, 2)]),  # strides by floor division
    ((32, 32), [(8, 8), (4, 4), (2, 2), (1, 1), (1, 1)]),
])
def test_anchor_generator_matches_torchvision(image_shape, feature_shapes):
  torch = pytest.importorskip('torch')
  pytest.importorskip('torchvision')
  from torchvision.models.detection.anchor_utils import AnchorGenerator
  from torchvision.models.detection.image_list import ImageList
  sizes = ((32,), (64,), (128,), (256,), (512,))
  ratios = ((0.5, 1.0, 2.0),) * 5
  ref_gen = AnchorGenerator(sizes, ratios)
  images = ImageList(torch.zeros(2, 3, *image_shape), [image_shape] * 2)
  features = [torch.zeros(2, 1, h, w) for h, w in feature_shapes]
  expected = ref_gen(images, features)
  gen = anchor_lib.AnchorGenerator(sizes, ratios)
  ours = gen(image_shape, feature_shapes)
  assert ours.dtype == np.float32
  np.testing.assert_array_equal(ours, expected[0].numpy())
  np.testing.assert_array_equal(ours, expected[1].numpy())
  assert gen.num_anchors_per_location() == tuple(ref_gen.num_anchors_per_location())
  assert sum(gen.num_anchors_per_level(feature_shapes)) == len(ours)


def test_several_sizes_per_level_match_torchvision():
  torch = pytest.importorskip('torch')
  pytest.importorskip('torchvision')
  from torchvision.models.detection.anchor_utils import AnchorGenerator
  from torchvision.models.detection.image_list import ImageList
  sizes, ratios = ((16, 40, 100),), ((0.25, 1.0, 3.0, 0.7),)
  images = ImageList(torch.zeros(1, 3, 48, 40), [(48, 40)])
  expected = AnchorGenerator(sizes, ratios)(images, [torch.zeros(1, 1, 6, 5)])[0]
  np.testing.assert_array_equal(anchor_lib.AnchorGenerator(sizes, ratios)((48, 40), [(6, 5)]),
                                expected.numpy())


def test_bad_arguments():
  with pytest.raises(ValueError, match='one aspect-ratio tuple per level'):
    anchor_lib.AnchorGenerator(((32,), (64,)), ((0.5, 1.0),))
  with pytest.raises(ValueError, match='2 feature maps'):
    anchor_lib.AnchorGenerator()((64, 64), [(16, 16), (8, 8)])
  with pytest.raises(ValueError, match='positive'):
    anchor_lib.AnchorGenerator(((0,),), ((1.0,),))
