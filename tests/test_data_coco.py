"""coco_instances: a tiny COCO 2017 download (json + JPEGs) in the real format, built without TF."""

import json
import os

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from segjax.data import build, coco, instance_pipeline, manual_files, sources
from segjax.evaluation import coco_eval

H, W = 32, 48


def _rect(x0, y0, x1, y1):
  return [[x0, y0, x1, y0, x1, y1, x0, y1]]


def _rle(mask, compressed):
  rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
  if compressed:
    return {'size': [H, W], 'counts': rle['counts'].decode('ascii')}
  flat = mask.astype(np.uint8).flatten(order='F')  # Uncompressed: run lengths, column-major.
  runs, value, count = [], 0, 0
  for v in flat:
    if v == value:
      count += 1
    else:
      runs.append(count)
      value, count = v, 1
  runs.append(count)
  return {'size': [H, W], 'counts': runs}


def _blob(y0, y1, x0, x1):
  m = np.zeros((H, W), bool)
  m[y0:y1, x0:x1] = True
  m[y0, x0] = False  # Not a rectangle: the mask is not its box.
  return m


# image id -> list of (category id, segmentation kind, iscrowd, region).
ANNOTATIONS = {
    'train': {
        101: [(1, 'polygon', 0, (2, 3, 20, 25)), (18, 'polygon', 0, (24, 4, 44, 28))],
        102: [(3, 'rle', 0, (5, 10, 15, 30)), (1, 'compressed', 1, (0, 16, 47, 31))],
        103: [],
        104: [(1, 'compressed', 1, (0, 0, 10, 10))],
    },
    'validation': {
        201: [(90, 'polygon', 0, (1, 1, 30, 16)), (18, 'compressed', 0, (20, 25, 46, 31)),
              (1, 'compressed', 1, (0, 20, 10, 31))],
        202: [(44, 'rle', 0, (8, 2, 40, 12))],
        203: [],
    },
}
GRAYSCALE = {102}  # a grayscale JPEG, as COCO has a few


def _segmentation(kind, region):
  if kind == 'polygon':
    return _rect(*region)
  x0, y0, x1, y1 = region
  return _rle(_blob(y0, y1, x0, x1), compressed=kind == 'compressed')


def write_coco(root: str) -> str:
  rng = np.random.default_rng(0)
  os.makedirs(os.path.join(root, 'annotations'), exist_ok=True)
  ann_id = 1
  for split, folder in coco.SPLITS.items():
    os.makedirs(os.path.join(root, folder), exist_ok=True)
    images, annotations = [], []
    for image_id, anns in ANNOTATIONS[split].items():
      file_name = f'{image_id:012d}.jpg'
      pixels = rng.integers(0, 256, (H, W, 3), dtype=np.uint8)
      image = Image.fromarray(pixels)
      (image.convert('L') if image_id in GRAYSCALE else image).save(
          os.path.join(root, folder, file_name), quality=95)
      images.append({'id': image_id, 'file_name': file_name, 'height': H, 'width': W})
      for category, kind, crowd, region in anns:
        segmentation = _segmentation(kind, region)
        rle = (mask_utils.merge(mask_utils.frPyObjects(segmentation, H, W))
               if kind == 'polygon' else None)
        area = float(mask_utils.area(rle)) if rle else float(_blob(
            region[1], region[3], region[0], region[2]).sum())
        x0, y0, x1, y1 = region
        annotations.append({'id': ann_id, 'image_id': image_id, 'category_id': category,
                            'segmentation': segmentation, 'area': area, 'iscrowd': crowd,
                            'bbox': [x0, y0, x1 - x0, y1 - y0]})
        ann_id += 1
    with open(coco.annotation_path(root, split), 'w') as f:
      json.dump({'images': images, 'annotations': annotations,
                 'categories': [{'id': c, 'name': n, 'supercategory': 'x'}
                                for c, n in coco.CATEGORIES]}, f)
  return root


def _records(name, split, data_dir):
  source = sources.load_data_source(name, split, data_dir)
  return {int(r['image_id']): r for r in (source[i] for i in range(len(source)))}


@pytest.fixture(scope='module')
def built(tmp_path_factory):
  root = write_coco(str(tmp_path_factory.mktemp('coco_files')))
  data_dir = str(tmp_path_factory.mktemp('coco_tfds'))
  build.build_dataset('coco_instances', root, data_dir, num_threads=2)
  build.build_dataset('coco_instances/keep_empty', root, data_dir, num_threads=2)
  return root, data_dir


def test_split_membership_and_empty_images(built):
  _, data_dir = built
  assert sorted(_records('coco_instances', 'train', data_dir)) == [101, 102]
  assert sorted(_records('coco_instances', 'validation', data_dir)) == [201, 202, 203]
  assert sorted(_records('coco_instances/keep_empty', 'train', data_dir)) == [101, 102, 103, 104]
  info = sources.get_builder('coco_instances', data_dir).info
  assert info.metadata['dropped_without_annotations'] == {'train': 2, 'validation': 0}


def test_label_mapping():
  assert len(coco.CATEGORY_IDS) == 80 and coco.NUM_CLASSES == 81
  assert coco.CATEGORY_IDS[16] == 18 and coco.CLASS_NAMES[16] == 'dog'
  assert coco.CATEGORY_IDS[79] == 90 and coco.CATEGORY_IDS[11] == 13


def test_masks_boxes_labels_match_pycocotools(built):
  root, data_dir = built
  for split in ('train', 'validation'):
    reference = COCO(coco.annotation_path(root, split))
    records = _records('coco_instances', split, data_dir)
    for image_id, record in records.items():
      anns = reference.loadAnns(reference.getAnnIds(imgIds=[image_id]))
      objects = record['objects']
      assert record['image'].shape == (H, W, 3)
      assert len(objects['label']) == len(anns)
      for k, ann in enumerate(anns):
        np.testing.assert_array_equal(objects['mask'][k][..., 0], reference.annToMask(ann))
        x, y, w, h = ann['bbox']
        np.testing.assert_allclose(objects['bbox'][k], [y / H, x / W, (y + h) / H, (x + w) / W],
                                   atol=1e-6)
        assert coco.CATEGORY_IDS[int(objects['label'][k])] == ann['category_id']
        assert bool(objects['is_crowd'][k]) == bool(ann['iscrowd'])
  info = sources.get_builder('coco_instances', data_dir).info
  assert info.metadata['category_ids'] == list(coco.CATEGORY_IDS)
  assert info.metadata['annotation_files']['validation'] == os.path.abspath(
      coco.annotation_path(root, 'validation'))


def test_grayscale_jpeg_is_stored_as_rgb(built):
  _, data_dir = built
  image = _records('coco_instances', 'train', data_dir)[102]['image']
  assert image.shape == (H, W, 3)
  np.testing.assert_array_equal(image[..., 0], image[..., 1])


def test_instance_pipeline_drops_crowd_targets(built):
  _, data_dir = built
  out = instance_pipeline.DecodeInstances().map(_records('coco_instances', 'train', data_dir)[102])
  assert out['labels'].tolist() == [coco.CATEGORY_IDS.index(3) + 1]  # the car, not the crowd
  assert out['masks'].shape == (1, H, W)
  np.testing.assert_allclose(out['boxes'][0], [5, 10, 15, 30], atol=1e-4)


def _perfect_detections(records):
  results = []
  for image_id, r in records.items():
    objects = r['objects']
    for bbox, label, mask, crowd in zip(objects['bbox'], objects['label'], objects['mask'],
                                        objects['is_crowd']):
      if crowd:
        continue
      ymin, xmin, ymax, xmax = (float(v) for v in bbox)
      results.append({'image_id': image_id, 'category_id': int(label) + 1,
                      'bbox': [xmin * W, ymin * H, (xmax - xmin) * W, (ymax - ymin) * H],
                      'score': 1.0, 'segmentation': coco_eval.encode_masks(mask[None, ..., 0])[0]})
  return results


def test_ground_truth_against_itself_is_ap_1(built, tmp_path):
  root, data_dir = built
  records = _records('coco_instances', 'validation', data_dir)
  results = _perfect_detections(records)
  from_json = coco_eval.ground_truth_for_split('coco_instances', 'validation', data_dir,
                                               coco.NUM_CLASSES)
  # The original json's annotations (areas, polygons), renumbered to label + 1.
  assert len(from_json.getAnnIds()) == 4 and len(from_json.getImgIds()) == 3
  first = from_json.loadAnns(from_json.getAnnIds(imgIds=[201]))[0]
  assert first['segmentation'] == _rect(1, 1, 30, 16)  # the json's polygon, not an RLE
  assert sorted(from_json.getCatIds())[-1] == 80
  assert from_json.loadAnns(from_json.getAnnIds(imgIds=[202]))[0]['category_id'] == \
      coco.CATEGORY_IDS.index(44) + 1
  metrics = coco_eval.evaluate(from_json, results)
  assert metrics['bbox_AP'] == pytest.approx(1.0) and metrics['segm_AP'] == pytest.approx(1.0)
  # Without the json, the records give the same answer (crowd kept as crowd).
  from_records = coco_eval.ground_truth_from_source(records.values(), coco.NUM_CLASSES)
  assert sum(a['iscrowd'] for a in from_records.dataset['annotations']) == 1
  metrics = coco_eval.evaluate(from_records, results)
  assert metrics['bbox_AP'] == pytest.approx(1.0) and metrics['segm_AP'] == pytest.approx(1.0)
  # A missed object costs AP: the check can fail.
  metrics = coco_eval.evaluate(from_json, results[1:])
  assert metrics['segm_AP'] < 0.9


def test_missing_annotation_file_names_it(tmp_path):
  root = write_coco(str(tmp_path / 'files'))
  os.remove(coco.annotation_path(root, 'validation'))
  with pytest.raises(manual_files.ManualFilesError, match='instances_val2017.json'):
    build.build_dataset('coco_instances', root, str(tmp_path / 'tfds'))


def test_rle_of_wrong_size_raises_naming_it(tmp_path):
  root = write_coco(str(tmp_path / 'files'))
  path = coco.annotation_path(root, 'train')
  with open(path) as f:
    data = json.load(f)
  data['annotations'][2]['segmentation']['size'] = [H, W + 1]
  with open(path, 'w') as f:
    json.dump(data, f)
  with pytest.raises(manual_files.BadExampleError,
                     match=r'000000000102.jpg annotation 3: RLE size \[32, 49\] differs'):
    build.build_dataset('coco_instances', root, str(tmp_path / 'tfds'), num_threads=1)


def test_corrupt_image_is_skipped_and_counted(tmp_path):
  root = write_coco(str(tmp_path / 'files'))
  with open(os.path.join(root, 'val2017', '000000000202.jpg'), 'wb') as f:
    f.write(b'truncated')
  builder = build.build_dataset('coco_instances', root, str(tmp_path / 'tfds'),
                                skip_bad_examples=True)
  assert builder.info.splits['validation'].num_examples == 2
  skipped = builder.info.metadata['skipped']['validation']
  assert len(skipped) == 1 and '000000000202.jpg: cannot read it as an image' in skipped[0]
