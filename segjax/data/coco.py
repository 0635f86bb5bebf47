"""`coco_instances`: COCO 2017 instance segmentation from the downloaded files, no TensorFlow.

TFDS's `coco/2017` has no instance masks; this builder reads the official json and
images and converts every annotation (polygons, uncompressed RLE, compressed RLE) to a
per-instance mask with pycocotools.

Layout (`--manual_dir`):
  annotations/instances_train2017.json, annotations/instances_val2017.json
  train2017/<file_name>.jpg, val2017/<file_name>.jpg

Splits: train (train2017), validation (val2017). Configs:
  default      drops train images without a usable (non-crowd, positive-size)
               annotation, as torchvision's detection reference does (117,266 of 118,287
               with the full download); validation keeps all 5,000 images.
  keep_empty   keeps every image in both splits.

Features (sizes vary):
  image          uint8 [H, W, 3]: the original JPEG bytes (grayscale/CMYK JPEGs are
                 converted to RGB and stored as PNG)
  objects        Sequence, one entry per annotation in json order:
    bbox         the annotation's bbox [x, y, w, h] as normalised (ymin, xmin, ymax, xmax)
    label        ClassLabel(80): contiguous index of the category, in increasing COCO
                 category id (`CATEGORY_IDS[label]` is the COCO id)
    mask         uint8 [H, W, 1] 0/1, pycocotools' decoding of the segmentation
    is_crowd     bool, the annotation's iscrowd
  image_id       int64, the COCO image id
  file_name      the image's file name

Dataset info metadata: 'category_ids' (label -> COCO category id), 'annotation_files'
(split -> absolute path of the json it came from; `segjax.evaluation.coco_eval` scores
against it when it still exists, so the official areas and crowd regions are used),
'dropped_without_annotations' (split -> count), 'skipped' (bad examples).

Bad inputs: a missing annotation file or image folder, or a json whose categories are
not COCO 2017's 80, stops the build naming it. A corrupt or missing image, an RLE whose
size differs from the image's, or a category id not in the json raises
`BadExampleError` naming it, or with `--skip_bad_examples` is logged, counted, skipped.
Annotations with a zero-size box are kept in the record (the instance pipeline drops
them from training targets, with crowd regions).
"""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np
import tensorflow_datasets as tfds
from etils import epath
from absl import logging
from pycocotools import mask as mask_utils

from segjax.data import manual_files
from segjax.data.manual_files import BadExampleError, ManualFilesError

# COCO 2017 instance categories (id, name); ids 12, 26, 29, 30, 45, 66, 68, 69, 71, 83
# are unused.
CATEGORIES = (
    (1, 'person'), (2, 'bicycle'), (3, 'car'), (4, 'motorcycle'), (5, 'airplane'),
    (6, 'bus'), (7, 'train'), (8, 'truck'), (9, 'boat'), (10, 'traffic light'),
    (11, 'fire hydrant'), (13, 'stop sign'), (14, 'parking meter'), (15, 'bench'),
    (16, 'bird'), (17, 'cat'), (18, 'dog'), (19, 'horse'), (20, 'sheep'), (21, 'cow'),
    (22, 'elephant'), (23, 'bear'), (24, 'zebra'), (25, 'giraffe'), (27, 'backpack'),
    (28, 'umbrella'), (31, 'handbag'), (32, 'tie'), (33, 'suitcase'), (34, 'frisbee'),
    (35, 'skis'), (36, 'snowboard'), (37, 'sports ball'), (38, 'kite'),
    (39, 'baseball bat'), (40, 'baseball glove'), (41, 'skateboard'), (42, 'surfboard'),
    (43, 'tennis racket'), (44, 'bottle'), (46, 'wine glass'), (47, 'cup'), (48, 'fork'),
    (49, 'knife'), (50, 'spoon'), (51, 'bowl'), (52, 'banana'), (53, 'apple'),
    (54, 'sandwich'), (55, 'orange'), (56, 'broccoli'), (57, 'carrot'), (58, 'hot dog'),
    (59, 'pizza'), (60, 'donut'), (61, 'cake'), (62, 'chair'), (63, 'couch'),
    (64, 'potted plant'), (65, 'bed'), (67, 'dining table'), (70, 'toilet'), (72, 'tv'),
    (73, 'laptop'), (74, 'mouse'), (75, 'remote'), (76, 'keyboard'), (77, 'cell phone'),
    (78, 'microwave'), (79, 'oven'), (80, 'toaster'), (81, 'sink'), (82, 'refrigerator'),
    (84, 'book'), (85, 'clock'), (86, 'vase'), (87, 'scissors'), (88, 'teddy bear'),
    (89, 'hair drier'), (90, 'toothbrush'),
)
CATEGORY_IDS = tuple(c for c, _ in CATEGORIES)
CLASS_NAMES = tuple(n for _, n in CATEGORIES)
NUM_CLASSES = len(CATEGORIES) + 1  # 81: the detector's classes, background included
_LABEL_OF_ID = {c: i for i, c in enumerate(CATEGORY_IDS)}
SPLITS = {'train': 'train2017', 'validation': 'val2017'}


def annotation_path(manual_dir: str, split: str) -> str:
  return os.path.join(manual_dir, 'annotations', f'instances_{SPLITS[split]}.json')


def annotation_mask(segmentation, height: int, width: int, where: str) -> np.ndarray:
  """uint8 [H, W] 0/1 mask of a COCO segmentation (polygons, RLE or compressed RLE)."""
  if isinstance(segmentation, list):  # Polygons [[x1, y1, x2, y2, ...], ...].
    if not segmentation:
      raise BadExampleError(f'{where}: empty polygon list; expected polygons or an RLE.')
    rle = mask_utils.merge(mask_utils.frPyObjects(segmentation, height, width))
  elif isinstance(segmentation, dict) and 'counts' in segmentation:
    size = [int(s) for s in segmentation.get('size', ())]
    if size != [height, width]:
      raise BadExampleError(f'{where}: RLE size {size} differs from the image size '
                            f'[{height}, {width}]; expected the same.')
    if isinstance(segmentation['counts'], list):  # Uncompressed RLE.
      rle = mask_utils.frPyObjects(segmentation, height, width)
    else:
      rle = dict(segmentation, counts=segmentation['counts'].encode('ascii')
                 if isinstance(segmentation['counts'], str) else segmentation['counts'])
  else:
    raise BadExampleError(f'{where}: segmentation of type {type(segmentation).__name__}; '
                          'expected a polygon list or an RLE dict with counts and size.')
  return mask_utils.decode(rle).astype(np.uint8)


def normalized_bbox(bbox, height: int, width: int) -> tfds.features.BBox:
  """COCO [x, y, w, h] pixels -> BBox(ymin, xmin, ymax, xmax) in [0, 1]."""
  x, y, w, h = (float(v) for v in bbox)
  ymin, xmin = min(max(y / height, 0.0), 1.0), min(max(x / width, 0.0), 1.0)
  ymax, xmax = min(max((y + h) / height, ymin), 1.0), min(max((x + w) / width, xmin), 1.0)
  return tfds.features.BBox(ymin, xmin, ymax, xmax)


def _usable(annotation: dict) -> bool:
  return not annotation.get('iscrowd', 0) and min(annotation['bbox'][2:]) > 0


@dataclasses.dataclass(eq=False)
class CocoConfig(tfds.core.BuilderConfig):
  drop_train_images_without_annotations: bool = True


class CocoInstances(manual_files.ManualBuilder):
  """COCO 2017 instances: boxes, labels, per-instance masks and crowd flags."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Initial release.'}
  BUILDER_CONFIGS = [
      CocoConfig(name='default', description='Train images without annotations dropped.'),
      CocoConfig(name='keep_empty', drop_train_images_without_annotations=False,
                 description='Every image kept.'),
  ]
  DEFAULT_BUILDER_CONFIG_NAME = 'default'
  MANUAL_DOWNLOAD_INSTRUCTIONS = """
  annotations/instances_{train,val}2017.json (annotations_trainval2017.zip) and the image
  folders train2017/ and val2017/ (train2017.zip, val2017.zip) in --manual_dir.
  """
  code_path = epath.Path(__file__)

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description='COCO 2017 instance segmentation from the official json and images.',
        features=tfds.features.FeaturesDict({
            'image': tfds.features.Image(shape=(None, None, 3), encoding_format='jpeg'),
            'objects': tfds.features.Sequence({
                'bbox': tfds.features.BBoxFeature(),
                'label': tfds.features.ClassLabel(names=list(CLASS_NAMES)),
                'mask': tfds.features.Image(shape=(None, None, 1)),
                'is_crowd': np.bool_,
            }),
            'image_id': np.int64,
            'file_name': tfds.features.Text(),
        }),
        homepage='https://cocodataset.org',
        metadata=tfds.core.MetadataDict(),
    )

  def _split_generators(self, dl_manager):
    manual_dir = self._manual_root(dl_manager)
    paths = {}
    for split, folder in SPLITS.items():
      paths[split] = manual_files.require_file(annotation_path(manual_dir, split),
                                               f'the COCO {folder} annotations')
      manual_files.require_dir(os.path.join(manual_dir, folder), f'the COCO {folder} images')
    self.info.metadata['category_ids'] = list(CATEGORY_IDS)
    self.info.metadata['annotation_files'] = {s: os.path.abspath(p) for s, p in paths.items()}
    self.info.metadata['dropped_without_annotations'] = {}
    return {split: self._generate_examples(split, self._items(manual_dir, split, path))
            for split, path in paths.items()}

  def _items(self, manual_dir: str, split: str, path: str) -> list[tuple]:
    """[(image path, image dict, its annotations)] of one split, in json image order."""
    with open(path) as f:
      data = json.load(f)
    for key in ('images', 'annotations', 'categories'):
      if key not in data:
        raise ManualFilesError(f'{path} has no {key!r} list; expected a COCO instances json.')
    found = {(int(c['id']), c['name']) for c in data['categories']}
    if found != set(CATEGORIES):
      raise ManualFilesError(
          f'{path}: categories differ from COCO 2017\'s 80 instance categories (unexpected: '
          f'{sorted(found - set(CATEGORIES))[:5]}, missing: '
          f'{sorted(set(CATEGORIES) - found)[:5]}).')
    by_image: dict[int, list[dict]] = {}
    for annotation in data['annotations']:
      by_image.setdefault(int(annotation['image_id']), []).append(annotation)
    folder = os.path.join(manual_dir, SPLITS[split])
    drop = split == 'train' and self.builder_config.drop_train_images_without_annotations
    items, dropped = [], 0
    for image in data['images']:
      annotations = by_image.get(int(image['id']), [])
      if drop and not any(_usable(a) for a in annotations):
        dropped += 1
        continue
      items.append((os.path.join(folder, image['file_name']), image, annotations))
    if dropped:
      logging.info('%s: dropped %d images without usable annotations.', split, dropped)
    self.info.metadata['dropped_without_annotations'][split] = dropped
    return items

  def _load(self, item: tuple) -> tuple[str, dict]:
    image_path, image, annotations = item
    image_bytes, height, width = manual_files.read_rgb_image(image_path)
    if (int(image.get('height', height)), int(image.get('width', width))) != (height, width):
      raise BadExampleError(
          f'{image_path}: image is {height}x{width} (HxW) but the json says '
          f'{image["height"]}x{image["width"]}; expected the same.')
    objects = {'bbox': [], 'label': [], 'mask': [], 'is_crowd': []}
    for a in annotations:
      where = f'{image_path} annotation {a.get("id")}'
      if int(a['category_id']) not in _LABEL_OF_ID:
        raise BadExampleError(f'{where}: category_id {a["category_id"]} is not a COCO 2017 '
                              'instance category.')
      mask = annotation_mask(a['segmentation'], height, width, where)
      objects['bbox'].append(normalized_bbox(a['bbox'], height, width))
      objects['label'].append(_LABEL_OF_ID[int(a['category_id'])])
      objects['mask'].append(manual_files.encode_png(mask))
      objects['is_crowd'].append(bool(a.get('iscrowd', 0)))
    return str(image['id']), {
        'image': image_bytes,
        'objects': objects,
        'image_id': int(image['id']),
        'file_name': image['file_name'],
    }
