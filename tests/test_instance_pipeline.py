"""Tests for `segjax.data.instance_pipeline`: the transforms on synthetic records with
hand-computed numbers, and the loaders on digit_scenes/tiny (40 train / 10 validation)."""

import itertools

import numpy as np
import pytest

from segjax.data import instance_pipeline as ip
from segjax.data import sources, transforms

NUM_TRAIN, NUM_EVAL = 40, 10  # digit_scenes/tiny
BATCH_KEYS = {'image', 'image_size', 'gt_boxes', 'gt_labels', 'gt_valid', 'gt_masks',
              'image_id', 'scale', 'orig_size'}


@pytest.fixture
def config(data_dir):
  c = ip.default_instance_dataset_config()
  c.name = 'digit_scenes/tiny'
  c.data_dir = data_dir
  c.prefetch = 0
  return c


@pytest.fixture(scope='module')
def records_by_id(data_dir):
  out = {}
  for split in ('train', 'validation'):
    src = sources.load_data_source('digit_scenes/tiny', split, data_dir)
    out[split] = {int(src[i]['image_id']): src[i] for i in range(len(src))}
  return out


def _take(loader, n):
  return list(itertools.islice(iter(loader), n))


def _assert_batches_equal(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for k in x:
      np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def _mask_extent(mask):
  """(x1, y1, x2, y2), end exclusive, of the nonzero pixels of [H, W]."""
  rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
  return np.asarray([cols[0], rows[0], cols[-1] + 1, rows[-1] + 1], np.float32)


def _synthetic_record(height=40, width=80):
  """Two rectangles: label 3 at rows 8..23, cols 20..59; label 0 at rows 0..3, cols 0..7."""
  image = np.zeros((height, width, 3), np.uint8)
  image[:, :, 0] = np.arange(width, dtype=np.uint8)[None]  # a horizontal ramp
  masks, bboxes = [], []
  for y1, x1, y2, x2 in ((8, 20, 24, 60), (0, 0, 4, 8)):
    m = np.zeros((height, width, 1), np.uint8)
    m[y1:y2, x1:x2] = 1
    masks.append(m)
    bboxes.append(np.asarray([y1 / height, x1 / width, y2 / height, x2 / width], np.float32))
  return {'image': image, 'image_id': 5,
          'objects': {'bbox': bboxes, 'label': [np.int64(3), np.int64(0)], 'mask': masks}}


def test_decode_converts_boxes_and_labels():
  out = ip.DecodeInstances().map(_synthetic_record())
  np.testing.assert_array_equal(out['boxes'], [[20, 8, 60, 24], [0, 0, 8, 4]])
  np.testing.assert_array_equal(out['labels'], [4, 1])  # dataset label + 1
  assert out['labels'].dtype == np.int32 and out['masks'].shape == (2, 40, 80)
  assert out['image_id'] == 5
  for box, mask in zip(out['boxes'], out['masks']):
    np.testing.assert_array_equal(_mask_extent(mask), box)


def test_resize_scale_follows_torchvision():
  # Short side to min_size unless the long side would pass max_size.
  assert ip.resize_scale(40, 80, 20, 100) == pytest.approx(0.5)
  assert ip.resize_scale(40, 80, 20, 30) == pytest.approx(30 / 80)
  assert ip.resize_scale(64, 64, 800, 1333) == pytest.approx(12.5)


def test_resize_and_pad_synthetic_record():
  # 40x80, min 20 / max 30: scale min(20/40, 30/80) = 0.375 -> 15x30.
  element = ip.ResizeInstances(20, 30).map(ip.DecodeInstances().map(_synthetic_record()))
  np.testing.assert_allclose(element['scale'], [15 / 40, 30 / 80])
  assert element['image'].shape == (15, 30, 3) and element['masks'].shape == (2, 15, 30)
  # 40x80, min 20 / max 40: scale 0.5 -> 20x40, padded to 24x44.
  element = ip.ResizeInstances(20, 40).map(ip.DecodeInstances().map(_synthetic_record()))
  np.testing.assert_array_equal(element['orig_size'], [40, 80])
  np.testing.assert_allclose(element['scale'], [0.5, 0.5])
  np.testing.assert_allclose(element['boxes'], [[10, 4, 30, 12], [0, 0, 4, 2]])
  # Bilinear halving of the column ramp 0..79: pixel c averages columns 2c and 2c + 1.
  np.testing.assert_allclose(element['image'][0, :, 0], np.arange(40) * 2 + 0.5, atol=0.51)
  out = ip.PadInstances((24, 44), max_instances=3, pad_value=(1.0, 2.0, 3.0)).map(element)
  np.testing.assert_array_equal(out['image_size'], [20, 40])
  np.testing.assert_array_equal(out['image'][20:], np.broadcast_to([1.0, 2.0, 3.0], (4, 44, 3)))
  np.testing.assert_array_equal(out['image'][:, 40:], np.broadcast_to([1.0, 2.0, 3.0], (24, 4, 3)))
  np.testing.assert_array_equal(out['gt_valid'], [True, True, False])
  np.testing.assert_array_equal(out['gt_labels'], [4, 1, 0])
  assert not out['gt_masks'][2].any() and not out['gt_boxes'][2].any()
  # Nearest: output row r reads source row 2r + 1, so rows 8..23 -> 4..11, cols 20..59
  # -> 10..29: exactly the halved box.
  expected = np.zeros((24, 44), np.uint8)
  expected[4:12, 10:30] = 1
  np.testing.assert_array_equal(out['gt_masks'][0], expected)
  np.testing.assert_array_equal(_mask_extent(out['gt_masks'][1]), [0, 0, 4, 2])
  assert out['image_id'] == 5 and out['gt_masks'].dtype == np.uint8


def test_resized_whole_image_box_stays_inside_the_image():
  # Found by tests/test_fuzz_inputs.py: a 9x11 image resized with min 24 / max 40 is
  # 24x29, and the whole-image box's x2 = 11 * float32(29 / 11) = 29.000002 > 29.
  element = {'image': np.zeros((9, 11, 3), np.uint8),
             'boxes': np.asarray([[0, 0, 11, 9]], np.float32),
             'masks': np.ones((1, 9, 11), np.uint8)}
  out = ip.ResizeInstances(24, 40).map(element)
  assert out['image'].shape[:2] == (24, 29)
  np.testing.assert_array_equal(out['boxes'], [[0, 0, 29, 24]])


def test_pad_truncates_to_max_instances_and_rejects_large_images():
  element = ip.ResizeInstances(40, 80).map(ip.DecodeInstances().map(_synthetic_record()))
  out = ip.PadInstances((40, 80), max_instances=1, pad_value=(0, 0, 0)).map(element)
  np.testing.assert_array_equal(out['gt_labels'], [4])  # the first in record order
  np.testing.assert_array_equal(out['gt_boxes'], [[20, 8, 60, 24]])
  with pytest.raises(ValueError, match=r'40x80.*pad_size=\(32, 80\)'):
    ip.PadInstances((32, 80), max_instances=1, pad_value=(0, 0, 0)).map(element)


def test_padding_record_is_all_invalid():
  out = ip.PadInstances((8, 8), max_instances=2, pad_value=(5, 5, 5)).map(
      {transforms.PADDING_KEY: True})
  assert out['image_id'] == -1 and not out['gt_valid'].any() and not out['gt_masks'].any()
  np.testing.assert_array_equal(out['image'], np.full((8, 8, 3), 5.0))


def test_flip_mirrors_image_boxes_and_masks():
  element = ip.DecodeInstances().map(_synthetic_record())
  flipped = ip.RandomHorizontalFlipInstances(p=1.0).random_map(element,
                                                              np.random.default_rng(0))
  np.testing.assert_array_equal(flipped['image'], element['image'][:, ::-1])
  np.testing.assert_array_equal(flipped['masks'], element['masks'][:, :, ::-1])
  # x -> 80 - x, the ends swapped: [20, 60) -> [20, 60); [0, 8) -> [72, 80).
  np.testing.assert_array_equal(flipped['boxes'], [[20, 8, 60, 24], [72, 0, 80, 4]])
  for box, mask in zip(flipped['boxes'], flipped['masks']):
    np.testing.assert_array_equal(_mask_extent(mask), box)
  unchanged = ip.RandomHorizontalFlipInstances(p=0.0).random_map(element,
                                                                np.random.default_rng(0))
  np.testing.assert_array_equal(unchanged['boxes'], element['boxes'])


def _check_batch_against_records(batch, records, c, size):
  """Every real example of `batch` against its source record (looked up by image_id)."""
  for i, image_id in enumerate(batch['image_id']):
    record = records[int(image_id)]
    n = len(record['objects']['label'])
    k = min(n, c.max_instances)
    h, w = batch['image_size'][i]
    assert (h, w) == (size, size)
    np.testing.assert_array_equal(batch['orig_size'][i], [64, 64])
    np.testing.assert_allclose(batch['scale'][i], [size / 64, size / 64])
    np.testing.assert_array_equal(batch['gt_valid'][i], np.arange(c.max_instances) < k)
    np.testing.assert_array_equal(batch['gt_labels'][i, :k],
                                  np.asarray(record['objects']['label'][:k]) + 1)
    # Padded ground truth: zero boxes, labels, masks; masks zero in the image padding.
    assert not batch['gt_labels'][i, k:].any() and not batch['gt_boxes'][i, k:].any()
    assert not batch['gt_masks'][i, k:].any()
    assert not batch['gt_masks'][i, :, h:].any() and not batch['gt_masks'][i, :, :, w:].any()
    # Image padding is the mean, 0 after Normalize.
    assert not batch['image'][i, h:].any() and not batch['image'][i, :, w:].any()
    for j in range(k):
      extent = _mask_extent(batch['gt_masks'][i, j])
      box = batch['gt_boxes'][i, j]
      if size == 64:  # native size: the box is exactly the visible mask's extent
        np.testing.assert_array_equal(extent, box)
      else:
        # Nearest-resized mask vs scaled box: inside the box's pixels, and less than
        # 2 px short of it (a thin stroke at a digit's edge can fall between the
        # sampled rows or columns).
        assert (extent[:2] >= np.floor(box[:2])).all(), (extent, box)
        assert (extent[2:] <= np.ceil(box[2:])).all(), (extent, box)
        np.testing.assert_allclose(extent, box, atol=2.0)
      np.testing.assert_array_equal(
          batch['gt_boxes'][i, j],
          np.asarray(record['objects']['bbox'][j])[[1, 0, 3, 2]].astype(np.float32) * size)


@pytest.mark.parametrize('size', [64, 48])
def test_train_batches_match_records(config, records_by_id, size):
  config.min_size = config.max_size = size
  config.pad_size = (56, 72) if size == 48 else (64, 72)
  config.max_instances = 3  # digit_scenes has up to 4: truncation is exercised
  batches = _take(ip.create_train_loader(config, global_batch_size=8, seed=0,
                                         process_index=0, process_count=1), 3)
  batch = batches[0]
  assert batch.keys() == BATCH_KEYS
  ph, pw = config.pad_size
  assert batch['image'].shape == (8, ph, pw, 3) and batch['image'].dtype == np.float32
  assert batch['gt_masks'].shape == (8, 3, ph, pw) and batch['gt_masks'].dtype == np.uint8
  assert batch['gt_boxes'].shape == (8, 3, 4) and batch['gt_boxes'].dtype == np.float32
  assert batch['gt_labels'].dtype == np.int32 and batch['gt_valid'].dtype == bool
  assert batch['image_size'].dtype == np.int32 and batch['orig_size'].dtype == np.int32
  for b in batches:
    _check_batch_against_records(b, records_by_id['train'], config, size)
  ids = np.concatenate([b['image_id'] for b in batches])
  assert len(set(ids.tolist())) == 24  # 24 distinct scenes from the first epoch of 40
  assert (ids >= 0).all() and (ids < NUM_TRAIN).all()
  assert any(len(records_by_id['train'][int(i)]['objects']['label']) > 3 for i in ids)


def test_eval_loader_covers_the_split_once_with_padding(config, records_by_id):
  batches = _take(ip.create_eval_loader(config, global_batch_size=4, process_index=0,
                                        process_count=1), 100)
  assert len(batches) == 3  # 10 examples -> 12, the last two padding
  ids = np.concatenate([b['image_id'] for b in batches])
  assert sorted(ids[:NUM_EVAL].tolist()) == list(range(NUM_EVAL))
  np.testing.assert_array_equal(ids[NUM_EVAL:], [-1, -1])
  last = batches[-1]
  assert not last['gt_valid'][2:].any() and not last['image'][2:].any()
  for b in batches:
    real = {k: v[b['image_id'] >= 0] for k, v in b.items()}
    _check_batch_against_records(real, records_by_id['validation'], config, 64)


def test_hflip_mirrors_some_examples_consistently(config):
  def make(hflip):
    config.hflip = hflip
    return _take(ip.create_train_loader(config, global_batch_size=8, seed=3,
                                         process_index=0, process_count=1), 2)
  plain, flipped = make(False), make(True)
  num_flipped = 0
  for a, b in zip(plain, flipped):
    np.testing.assert_array_equal(a['image_id'], b['image_id'])  # same order
    for i in range(8):
      if np.array_equal(a['image'][i], b['image'][i]):
        np.testing.assert_array_equal(a['gt_boxes'][i], b['gt_boxes'][i])
        np.testing.assert_array_equal(a['gt_masks'][i], b['gt_masks'][i])
        continue
      num_flipped += 1
      np.testing.assert_array_equal(b['image'][i], a['image'][i][:, ::-1])
      np.testing.assert_array_equal(b['gt_masks'][i], a['gt_masks'][i][:, :, ::-1])
      expected = a['gt_boxes'][i].copy()
      valid = a['gt_valid'][i]
      expected[valid] = np.stack([64 - expected[valid, 2], expected[valid, 1],
                                  64 - expected[valid, 0], expected[valid, 3]], -1)
      np.testing.assert_array_equal(b['gt_boxes'][i], expected)
      for j in np.flatnonzero(valid):
        np.testing.assert_array_equal(_mask_extent(b['gt_masks'][i, j]), b['gt_boxes'][i, j])
  assert 0 < num_flipped < 16, num_flipped  # p = 0.5
  _assert_batches_equal(flipped, make(True))  # the flips depend only on the seed


def test_train_is_deterministic_for_a_seed_with_or_without_reader_threads(config):
  def make(seed, prefetch=0):
    config.prefetch = prefetch
    return ip.create_train_loader(config, global_batch_size=4, seed=seed, process_index=0,
                                  process_count=1)
  a, b, c = _take(make(7), 3), _take(make(7, prefetch=16), 3), _take(make(8), 3)
  _assert_batches_equal(a, b)
  assert not np.array_equal(np.concatenate([x['image_id'] for x in a]),
                            np.concatenate([x['image_id'] for x in c]))


def test_train_iterator_state_resume(config):
  def make():
    return ip.create_train_loader(config, global_batch_size=4, seed=1, process_index=0,
                                  process_count=1)
  it = iter(make())
  for _ in range(9):  # into the second epoch (40 / 4 = 10 batches per epoch)
    next(it)
  state = it.get_state()
  expected = [next(it) for _ in range(3)]
  resumed = iter(make())
  resumed.set_state(state)
  _assert_batches_equal([next(resumed) for _ in range(3)], expected)


def test_bad_config_raises(config):
  config.name = 'coco/2017'
  with pytest.raises(ValueError, match=r"name='coco/2017'.*\['digit_scenes', "
                                       r"'voc_segmentation', 'coco_instances'\]"):
    ip.create_train_loader(config, global_batch_size=2, seed=0, process_index=0,
                           process_count=1)
  config.name = 'digit_scenes/huge'
  with pytest.raises(ValueError, match=r"Unknown config 'huge'.*tiny"):
    ip.create_eval_loader(config, global_batch_size=2, process_index=0, process_count=1)
  config.name = 'digit_scenes/tiny'
  for field, value, pattern in (('min_size', 0, 'min_size=0'),
                                ('max_size', 32, 'min_size=64 must be <= max_size=32'),
                                ('num_classes', 1, 'num_classes=1'),
                                ('pad_size', (64, -1), 'pad_size')):
    bad = config.copy_and_resolve_references()
    bad[field] = value
    with pytest.raises(ValueError, match=pattern):
      ip.validate_instance_dataset_config(bad)
  del config['max_instances']
  with pytest.raises(ValueError, match=r"lacks fields \['max_instances'\]"):
    ip.validate_instance_dataset_config(config)


def test_image_larger_than_pad_size_raises_in_the_loader(config):
  config.pad_size = (48, 64)
  loader = ip.create_eval_loader(config, global_batch_size=2, process_index=0, process_count=1)
  with pytest.raises(ValueError, match=r'64x64.*pad_size=\(48, 64\)'):
    next(iter(loader))
