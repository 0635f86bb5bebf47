"""COCO box and mask AP through pycocotools (the reference implementation, never rewritten).

    gt = ground_truth_from_source(source)            # pycocotools COCO, RLE masks
    results = detections_to_coco(outputs, batch)     # padded model outputs -> COCO dicts
    metrics = evaluate(gt, results, iou_types=('bbox', 'segm'))
    metrics['bbox_AP'], metrics['segm_AP50'], ...

Ground truth: one COCO image per record (`image_id` of the record), one annotation per
object with its RLE mask (`pycocotools.mask.encode`), bbox [x, y, w, h] in pixels from
the normalised (ymin, xmin, ymax, xmax), area = mask area, iscrowd = the object's
`is_crowd` (0 when the dataset has none), category_id = dataset label + 1 (the model's
class index; 0 is background). For `coco_instances`, `ground_truth_for_split` instead
reads the original annotation json the split was built from, when it still exists
(`ground_truth_from_json`): the official areas, polygons and crowd regions, restricted
to the split's images, with category ids renumbered to label + 1.

Detections: boxes are mapped back to the original image (divided by the resize
scale); masks are pasted at the original resolution (`mask_rcnn.paste_masks_in_image`,
bilinear) and thresholded at 0.5, then RLE-encoded. Segmentation results are scored
with `segm_score_key` ('scores' = class confidence; 'mask_scores' = Mask Scoring
R-CNN's cls score x MaskIoU, §3.3).
"""

from __future__ import annotations

import contextlib
import functools
import io
import json
import os
from collections.abc import Iterable, Sequence
import jax
import numpy as np
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from segjax.models.detection.mask_rcnn import paste_masks_in_image

STAT_NAMES = ('AP', 'AP50', 'AP75', 'APs', 'APm', 'APl')
IOU_TYPES = ('bbox', 'segm')


def encode_masks(masks: np.ndarray) -> list[dict]:
  """[N, H, W] binary masks -> N COCO RLEs (counts as str, JSON-friendly)."""
  if len(masks) == 0:
    return []
  rles = mask_utils.encode(np.asfortranarray(np.moveaxis(masks.astype(np.uint8), 0, -1)))
  for rle in rles:
    rle['counts'] = rle['counts'].decode('ascii')
  return rles


def coco_from_annotations(images: list[dict], annotations: list[dict],
                          category_ids: Sequence[int]) -> COCO:
  """An in-memory pycocotools COCO ground truth."""
  coco = COCO()
  coco.dataset = {'images': images, 'annotations': annotations,
                  'categories': [{'id': int(c), 'name': str(c)} for c in category_ids]}
  with contextlib.redirect_stdout(io.StringIO()):
    coco.createIndex()
  return coco


def ground_truth_from_source(source: Iterable[dict], num_classes: int) -> COCO:
  """COCO ground truth of a TFDS instance-segmentation split (`digit_scenes` records)."""
  images, annotations = [], []
  for record in source:
    image_id = int(record['image_id'])
    height, width = record['image'].shape[:2]
    images.append({'id': image_id, 'height': int(height), 'width': int(width)})
    objects = record['objects']
    masks = np.stack([np.asarray(m).reshape(height, width) for m in objects['mask']]
                     ) if len(objects['mask']) else np.zeros((0, height, width), np.uint8)
    crowd = objects.get('is_crowd', [False] * len(masks))
    for bbox, label, rle, m, is_crowd in zip(objects['bbox'], objects['label'],
                                             encode_masks(masks), masks, crowd):
      ymin, xmin, ymax, xmax = (float(v) for v in bbox)
      x, y = xmin * width, ymin * height
      annotations.append({
          'id': len(annotations) + 1, 'image_id': image_id, 'category_id': int(label) + 1,
          'bbox': [x, y, xmax * width - x, ymax * height - y], 'area': float(m.sum()),
          'segmentation': rle, 'iscrowd': int(bool(is_crowd))})
  return coco_from_annotations(images, annotations, range(1, num_classes))


def ground_truth_from_json(path: str, image_ids: Iterable[int],
                           category_ids: Sequence[int]) -> COCO:
  """The ground truth of an original COCO annotation json, for the images `image_ids` only.

  category_ids: COCO category id of each dataset label (`coco_instances`'
  `info.metadata['category_ids']`); category `category_ids[k]` becomes k + 1, the
  model's class index. Annotations of other categories raise ValueError.
  """
  with open(path) as f:
    data = json.load(f)
  keep = {int(i) for i in image_ids}
  new_id = {int(c): k + 1 for k, c in enumerate(category_ids)}
  annotations = []
  for annotation in data['annotations']:
    if int(annotation['image_id']) not in keep:
      continue
    if int(annotation['category_id']) not in new_id:
      raise ValueError(f'{path}: annotation {annotation.get("id")} has category_id '
                       f'{annotation["category_id"]}, not one of the dataset\'s {list(new_id)}')
    annotations.append(dict(annotation, category_id=new_id[int(annotation['category_id'])]))
  images = [image for image in data['images'] if int(image['id']) in keep]
  return coco_from_annotations(images, annotations, range(1, len(category_ids) + 1))


def ground_truth_for_split(name: str, split: str, data_dir: str | None,
                           num_classes: int) -> COCO:
  """COCO ground truth of a split of a segjax instance dataset.

  From the annotation json the split was built from (`info.metadata['annotation_files']`,
  `coco_instances`) when that file still exists, else from the records.
  """
  from segjax.data import sources  # pylint: disable=import-outside-toplevel

  source = sources.load_data_source(name, split, data_dir)
  metadata = sources.get_builder(name, data_dir).info.metadata or {}
  path = metadata.get('annotation_files', {}).get(split.split('[')[0])
  if path and os.path.isfile(path):
    category_ids = list(metadata['category_ids'])
    if len(category_ids) + 1 != num_classes:
      raise ValueError(f'config.dataset.num_classes={num_classes} but {name!r} has '
                       f'{len(category_ids)} categories + background')
    return ground_truth_from_json(path, (source[i]['image_id'] for i in range(len(source))),
                                  category_ids)
  return ground_truth_from_source((source[i] for i in range(len(source))), num_classes)


@functools.partial(jax.jit, static_argnames=('image_size',))
def _paste(mask_probs, boxes, image_size):
  return paste_masks_in_image(mask_probs, boxes, image_size) > 0.5


def detections_to_coco(outputs: dict[str, np.ndarray], batch: dict[str, np.ndarray], *,
                       segm_score_key: str = 'scores') -> list[dict]:
  """Padded model outputs of one batch -> COCO result dicts (bbox and, with masks, segm).

  Args:
    outputs: host arrays 'boxes' [B, D, 4], 'scores', 'labels', 'valid' [B, D], optional
      'mask_probs' [B, D, m, m] and 'mask_scores' [B, D].
    batch: the input batch: 'image_id' [B] (-1: padding, skipped), 'scale' [B, 2],
      'orig_size' [B, 2].
  Returns:
    dicts {'image_id', 'category_id', 'bbox' [x, y, w, h], 'score'[, 'segmentation',
    'segm_score']}.
  """
  results = []
  for i, image_id in enumerate(np.asarray(batch['image_id'])):
    if image_id < 0:
      continue
    valid = np.asarray(outputs['valid'][i], bool)
    if not valid.any():
      continue
    sy, sx = (float(s) for s in batch['scale'][i])
    boxes = np.asarray(outputs['boxes'][i], np.float32)[valid] / np.asarray([sx, sy, sx, sy],
                                                                            np.float32)
    scores = np.asarray(outputs['scores'][i])[valid]
    labels = np.asarray(outputs['labels'][i])[valid]
    rles = [None] * len(boxes)
    segm_scores = scores
    if 'mask_probs' in outputs:
      height, width = (int(s) for s in batch['orig_size'][i])
      # Every slot is pasted (one compiled shape per image size, not one per number
      # of detections), then the valid ones are kept.
      all_boxes = np.asarray(outputs['boxes'][i], np.float32) / np.asarray([sx, sy, sx, sy],
                                                                            np.float32)
      masks = np.asarray(_paste(np.asarray(outputs['mask_probs'][i]), all_boxes,
                                (height, width)))[valid]
      rles = encode_masks(masks)
      segm_scores = np.asarray(outputs[segm_score_key][i])[valid]
    for box, score, label, rle, segm_score in zip(boxes, scores, labels, rles, segm_scores):
      x1, y1, x2, y2 = (float(v) for v in box)
      result = {'image_id': int(image_id), 'category_id': int(label),
                'bbox': [x1, y1, x2 - x1, y2 - y1], 'score': float(score)}
      if rle is not None:
        result['segmentation'] = rle
        result['segm_score'] = float(segm_score)
      results.append(result)
  return results


def evaluate(ground_truth: COCO, results: list[dict],
             iou_types: Sequence[str] = IOU_TYPES) -> dict[str, float]:
  """COCOeval per IoU type -> {'bbox_AP', 'bbox_AP50', 'bbox_AP75', 'bbox_APs', ...}.

  'segm' uses each result's 'segm_score' when present. No detections: every AP is 0.
  """
  metrics: dict[str, float] = {}
  for iou_type in iou_types:
    if iou_type not in IOU_TYPES:
      raise ValueError(f'iou_type={iou_type!r} is not one of {IOU_TYPES}')
    if iou_type == 'segm':
      # Without 'bbox', loadRes takes the area (for APs/m/l) from the mask.
      dets = [{'image_id': r['image_id'], 'category_id': r['category_id'],
               'segmentation': r['segmentation'], 'score': r.get('segm_score', r['score'])}
              for r in results if 'segmentation' in r]
    else:
      dets = [{k: v for k, v in r.items() if k not in ('segmentation', 'segm_score')}
              for r in results]
    if not dets:
      metrics.update({f'{iou_type}_{name}': 0.0 for name in STAT_NAMES})
      continue
    with contextlib.redirect_stdout(io.StringIO()):
      detections = ground_truth.loadRes(dets)
      coco_eval = COCOeval(ground_truth, detections, iou_type)
      coco_eval.evaluate()
      coco_eval.accumulate()
      coco_eval.summarize()
    for name, value in zip(STAT_NAMES, coco_eval.stats):
      # pycocotools reports -1 where no ground truth falls in a size range.
      metrics[f'{iou_type}_{name}'] = float(value)
  return metrics
