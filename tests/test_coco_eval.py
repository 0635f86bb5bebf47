"""Tests for `segjax.evaluation.coco_eval`: COCO AP against hand-computed numbers, the
ground truth built from records, RLE round trip, and padded model outputs mapped back
to the original image by `detections_to_coco`."""

import json

import numpy as np
import pytest
from pycocotools import mask as mask_utils

from segjax.evaluation import coco_eval

NUM_CLASSES = 4  # background + dataset labels 0, 1, 2 -> COCO categories 1, 2, 3
STATS = {f'{t}_{s}' for t in coco_eval.IOU_TYPES for s in coco_eval.STAT_NAMES}


def _record(image_id, height, width, objects):
  """A digit_scenes-like record; objects: (label, (y1, x1, y2, x2) pixel rows/cols, end
  exclusive), each a filled rectangle mask."""
  bboxes, labels, masks = [], [], []
  for label, (y1, x1, y2, x2) in objects:
    bboxes.append(np.asarray([y1 / height, x1 / width, y2 / height, x2 / width], np.float32))
    labels.append(np.int64(label))
    m = np.zeros((height, width, 1), np.uint8)
    m[y1:y2, x1:x2] = 1
    masks.append(m)
  return {'image_id': np.int64(image_id), 'image': np.zeros((height, width, 3), np.uint8),
          'objects': {'bbox': bboxes, 'label': labels, 'mask': masks}}


def _box_result(image_id, category_id, xywh, score, mask_hw=None):
  r = {'image_id': image_id, 'category_id': category_id, 'bbox': list(map(float, xywh)),
       'score': score}
  if mask_hw is not None:
    x, y, w, h = xywh
    m = np.zeros(mask_hw, np.uint8)
    m[y:y + h, x:x + w] = 1
    r['segmentation'] = coco_eval.encode_masks(m[None])[0]
  return r


def _interpolated_ap(tp_flags, num_gt):
  """COCO's 101-point AP of one category, written out independently of pycocotools:
  precision made monotone from the right, read at the first rank reaching each recall."""
  tp = np.cumsum(tp_flags)
  fp = np.cumsum(1 - np.asarray(tp_flags))
  recall, precision = tp / num_gt, tp / (tp + fp)
  precision = np.maximum.accumulate(precision[::-1])[::-1]
  total = 0.0
  for r in np.linspace(0, 1, 101):
    reached = np.flatnonzero(recall >= r - 1e-12)
    total += precision[reached[0]] if len(reached) else 0.0
  return total / 101


def test_ground_truth_from_records():
  gt = coco_eval.ground_truth_from_source(
      [_record(7, 40, 80, [(2, (5, 10, 25, 30)), (0, (0, 0, 8, 4))])], NUM_CLASSES)
  assert gt.getImgIds() == [7]
  assert gt.imgs[7]['height'] == 40 and gt.imgs[7]['width'] == 80
  assert sorted(gt.getCatIds()) == [1, 2, 3]
  anns = gt.loadAnns(gt.getAnnIds(imgIds=[7]))
  assert [a['category_id'] for a in anns] == [3, 1]  # dataset label + 1
  assert anns[0]['bbox'] == pytest.approx([10, 5, 20, 20])  # x, y, w, h in pixels
  assert anns[1]['bbox'] == pytest.approx([0, 0, 4, 8])
  assert [a['area'] for a in anns] == [400, 32]
  mask = mask_utils.decode(anns[0]['segmentation'])
  assert mask.shape == (40, 80) and mask.sum() == 400 and mask[5:25, 10:30].all()


def test_encode_masks_round_trip_and_json():
  rng = np.random.default_rng(0)
  masks = (rng.uniform(size=(3, 17, 23)) > 0.6).astype(np.uint8)
  rles = coco_eval.encode_masks(masks)
  assert len(rles) == 3 and coco_eval.encode_masks(np.zeros((0, 5, 5))) == []
  rles = json.loads(json.dumps(rles))  # counts are str, JSON-friendly
  for mask, rle in zip(masks, rles):
    assert rle['size'] == [17, 23]
    np.testing.assert_array_equal(mask_utils.decode(rle), mask)
    assert mask_utils.area(rle) == mask.sum()


def test_perfect_detections_give_ap_one():
  records = [_record(0, 64, 64, [(0, (4, 4, 20, 24)), (1, (30, 30, 60, 50))]),
             _record(1, 64, 64, [(2, (10, 40, 30, 60))])]
  gt = coco_eval.ground_truth_from_source(records, NUM_CLASSES)
  results = [_box_result(0, 1, (4, 4, 20, 16), 0.3, (64, 64)),
             _box_result(0, 2, (30, 30, 20, 30), 0.9, (64, 64)),
             _box_result(1, 3, (40, 10, 20, 20), 0.5, (64, 64))]
  metrics = coco_eval.evaluate(gt, results)
  assert set(metrics) == STATS
  for t in coco_eval.IOU_TYPES:
    for s in ('AP', 'AP50', 'AP75'):
      assert metrics[f'{t}_{s}'] == pytest.approx(1.0), (t, s)
    # Areas 320, 600, 400 < 32^2: all small; no medium or large ground truth -> -1.
    assert metrics[f'{t}_APs'] == pytest.approx(1.0)
    assert metrics[f'{t}_APm'] == -1.0 and metrics[f'{t}_APl'] == -1.0


def test_false_positive_between_two_hits_hand_computed():
  # 2 GT boxes; detections by score: hit, miss, hit. Precision 1, 1/2, 2/3 at recall
  # 1/2, 1/2, 1. Interpolated: 1 for the 51 recall points 0..0.50, 2/3 for the 50 points
  # 0.51..1 -> AP = (51 + 50 * 2/3) / 101 at every IoU threshold (the hits are exact).
  expected = (51 + 50 * 2 / 3) / 101
  assert _interpolated_ap([1, 0, 1], 2) == pytest.approx(expected)
  gt = coco_eval.ground_truth_from_source(
      [_record(3, 64, 64, [(0, (0, 0, 16, 16)), (0, (40, 40, 60, 60))])], NUM_CLASSES)
  results = [_box_result(3, 1, (0, 0, 16, 16), 0.9, (64, 64)),
             _box_result(3, 1, (20, 20, 10, 10), 0.8, (64, 64)),
             _box_result(3, 1, (40, 40, 20, 20), 0.7, (64, 64))]
  metrics = coco_eval.evaluate(gt, results)
  for t in coco_eval.IOU_TYPES:
    for s in ('AP', 'AP50', 'AP75', 'APs'):
      assert metrics[f'{t}_{s}'] == pytest.approx(expected, abs=1e-6), (t, s)

  # Segmentation ranks by 'segm_score' (Mask Scoring R-CNN): the miss ranked last
  # gives segm AP 1 while the box ranking is unchanged.
  for r, segm_score in zip(results, (0.9, 0.1, 0.7)):
    r['segm_score'] = segm_score
  metrics = coco_eval.evaluate(gt, results)
  assert metrics['segm_AP'] == pytest.approx(1.0)
  assert metrics['bbox_AP'] == pytest.approx(expected, abs=1e-6)


def test_partial_overlap_counts_only_at_low_iou_thresholds():
  # IoU of the detection with the GT box: (16 x 10) / (16 x 16) = 0.625, a hit at
  # thresholds 0.50, 0.55, 0.60 and a miss at 0.65..0.95: AP = 3/10, AP50 1, AP75 0.
  gt = coco_eval.ground_truth_from_source([_record(0, 32, 32, [(1, (0, 0, 16, 16))])],
                                          NUM_CLASSES)
  metrics = coco_eval.evaluate(gt, [_box_result(0, 2, (0, 0, 16, 10), 0.5)], ('bbox',))
  assert set(metrics) == {f'bbox_{s}' for s in coco_eval.STAT_NAMES}
  assert metrics['bbox_AP'] == pytest.approx(0.3)
  assert metrics['bbox_AP50'] == pytest.approx(1.0)
  assert metrics['bbox_AP75'] == pytest.approx(0.0)
  # The same box with the wrong class matches nothing.
  metrics = coco_eval.evaluate(gt, [_box_result(0, 1, (0, 0, 16, 16), 0.5)], ('bbox',))
  assert metrics['bbox_AP'] == pytest.approx(0.0)


def test_no_detections_and_bad_iou_type():
  gt = coco_eval.ground_truth_from_source([_record(0, 32, 32, [(1, (0, 0, 16, 16))])],
                                          NUM_CLASSES)
  assert coco_eval.evaluate(gt, []) == {name: 0.0 for name in STATS}
  # Box-only results (Faster R-CNN) have no segm detections.
  metrics = coco_eval.evaluate(gt, [_box_result(0, 2, (0, 0, 16, 16), 0.5)])
  assert metrics['bbox_AP'] == pytest.approx(1.0) and metrics['segm_AP'] == 0.0
  with pytest.raises(ValueError, match=r"iou_type='keypoints'.*bbox"):
    coco_eval.evaluate(gt, [], ('keypoints',))


def _outputs(boxes, scores, labels, valid, mask_probs=None, mask_scores=None):
  out = {'boxes': np.asarray(boxes, np.float32), 'scores': np.asarray(scores, np.float32),
         'labels': np.asarray(labels, np.int32), 'valid': np.asarray(valid, bool)}
  if mask_probs is not None:
    out['mask_probs'] = np.asarray(mask_probs, np.float32)
    out['mask_scores'] = np.asarray(mask_scores, np.float32)
  return out


def test_detections_to_coco_maps_back_to_the_original_image():
  # Image 0: original 40 x 80 (H x W), resized by 0.8 (rows) and 0.5 (columns) -- unequal,
  # so a swapped axis shows. A box (10, 5, 30, 25) of the original is (5, 4, 15, 20) in
  # the resized image. Row 1 of the batch is eval padding (image_id -1).
  d = 3
  boxes = np.zeros((2, d, 4), np.float32)
  boxes[0, 0] = (5, 4, 15, 20)
  boxes[0, 1] = (1, 1, 3, 3)  # not valid: dropped
  boxes[1, 0] = (0, 0, 8, 8)  # valid but in a padding example: dropped
  mask_probs = np.zeros((2, d, 28, 28), np.float32)
  mask_probs[0, 0] = 1.0
  outputs = _outputs(boxes, [[0.8, 0.7, 0.0], [0.9, 0, 0]], [[3, 1, 0], [2, 0, 0]],
                     [[True, False, False], [True, False, False]], mask_probs,
                     [[0.4, 0.3, 0.0], [0.5, 0, 0]])
  batch = {'image_id': np.asarray([11, -1], np.int64),
           'scale': np.asarray([[0.8, 0.5], [1.0, 1.0]], np.float32),
           'orig_size': np.asarray([[40, 80], [32, 40]], np.int32)}

  (result,) = coco_eval.detections_to_coco(outputs, batch, segm_score_key='mask_scores')
  assert result['image_id'] == 11 and result['category_id'] == 3
  assert result['bbox'] == pytest.approx([10, 5, 20, 20], abs=1e-4)
  assert result['score'] == pytest.approx(0.8) and result['segm_score'] == pytest.approx(0.4)
  # A constant mask pastes to exactly the box's pixels, at the original resolution.
  expected = np.zeros((40, 80), np.uint8)
  expected[5:25, 10:30] = 1
  np.testing.assert_array_equal(mask_utils.decode(result['segmentation']), expected)

  (result,) = coco_eval.detections_to_coco(outputs, batch)
  assert result['segm_score'] == pytest.approx(0.8)  # the class score by default

  # Through COCOeval against the record of that image: box and mask AP 1.
  gt = coco_eval.ground_truth_from_source([_record(11, 40, 80, [(2, (5, 10, 25, 30))])],
                                          NUM_CLASSES)
  metrics = coco_eval.evaluate(gt, coco_eval.detections_to_coco(outputs, batch))
  assert metrics['bbox_AP'] == pytest.approx(1.0) and metrics['segm_AP'] == pytest.approx(1.0)


def test_detections_to_coco_boxes_only_and_empty():
  boxes = np.asarray([[[2, 4, 10, 12], [0, 0, 0, 0]]], np.float32)
  batch = {'image_id': np.asarray([5]), 'scale': np.asarray([[2.0, 2.0]], np.float32),
           'orig_size': np.asarray([[16, 16]], np.int32)}
  (result,) = coco_eval.detections_to_coco(
      _outputs(boxes, [[0.6, 0.0]], [[1, 0]], [[True, False]]), batch)
  assert result['bbox'] == pytest.approx([1, 2, 4, 4])
  assert 'segmentation' not in result and 'segm_score' not in result
  assert coco_eval.detections_to_coco(
      _outputs(boxes, [[0.6, 0.0]], [[1, 0]], [[False, False]]), batch) == []
