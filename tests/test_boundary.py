"""Trimap (boundary band) metrics against hand-computed values."""

import numpy as np
import pytest

from segjax.evaluation import boundary


def test_band_of_a_vertical_edge():
  labels = np.zeros((4, 6), np.int64)
  labels[:, 3:] = 1  # edge between columns 2 and 3
  band1 = boundary.boundary_band(labels, 1)
  expected = np.zeros((4, 6), bool)
  expected[:, 2:4] = True
  np.testing.assert_array_equal(band1, expected)
  band2 = boundary.boundary_band(labels, 2)
  expected[:, 1:5] = True
  np.testing.assert_array_equal(band2, expected)


def test_band_is_per_image_in_a_batch():
  labels = np.zeros((2, 5, 5), np.int64)
  labels[0, 2, 2] = 3  # a single pixel: its 3x3 neighbourhood is the band
  band = boundary.boundary_band(labels, 1)
  assert band[0].sum() == 9 and band[0, 1:4, 1:4].all()
  assert not band[1].any()  # no edges in image 1; image 0 must not leak into it


def test_confusion_and_metrics_hand_computed():
  labels = np.array([[0, 0, 1, 1],
                     [0, 0, 1, 1],
                     [0, 255, 1, 1]])
  predictions = np.array([[0, 1, 1, 1],
                          [0, 0, 0, 1],
                          [1, 0, 1, 0]])
  # A pixel is in the width-1 band when its 3x3 window (clipped) holds two values; the
  # ignore pixel (2, 1) is a value of its own, so (1, 0) and (2, 0) are in; column 3
  # sees only 1s; (0, 0) only 0s.
  band = boundary.boundary_band(labels, 1)
  np.testing.assert_array_equal(band, [[False, True, True, False],
                                       [True, True, True, False],
                                       [True, True, True, False]])
  confusion = boundary.boundary_confusion(predictions, labels, None, num_classes=2, width=1)
  # Band pixels, the ignore pixel left out (7):
  #   label 0: (0,1)->1, (1,0)->0, (1,1)->0, (2,0)->1   => row [2, 2]
  #   label 1: (0,2)->1, (1,2)->0, (2,2)->1             => row [1, 2]
  # (2,3) is wrong but outside the band.
  np.testing.assert_array_equal(confusion, [[2, 2], [1, 2]])
  metrics = boundary.boundary_metrics(confusion)
  assert metrics['trimap_accuracy'] == pytest.approx(4 / 7)
  # IoU 0: 2 / (4 + 3 - 2); IoU 1: 2 / (3 + 4 - 2).
  assert metrics['trimap_miou'] == pytest.approx(0.4)


def test_valid_mask_and_bad_width():
  labels = np.array([[0, 1]])
  predictions = np.array([[0, 0]])
  confusion = boundary.boundary_confusion(predictions, labels, np.array([[True, False]]), 2, 1)
  np.testing.assert_array_equal(confusion, [[1, 0], [0, 0]])
  with pytest.raises(ValueError, match='width'):
    boundary.boundary_band(labels, 0)
