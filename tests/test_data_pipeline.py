"""Tests for `segjax.data.transforms` and `segjax.data.pipeline` (on digit_scenes/tiny)."""

import itertools
import json

import numpy as np
import pytest

from segjax.data import pipeline
from segjax.data import sources
from segjax.data import transforms

NUM_TRAIN, NUM_EVAL = 40, 10  # digit_scenes/tiny


@pytest.fixture
def config(data_dir):
  c = pipeline.default_dataset_config()
  c.name = 'digit_scenes/tiny'
  c.data_dir = data_dir
  c.prefetch = 0
  return c


@pytest.fixture(scope='module')
def eval_records(data_dir):
  src = sources.load_data_source('digit_scenes/tiny', 'validation', data_dir)
  return [src[i] for i in range(len(src))]


def _take(loader, n):
  return list(itertools.islice(iter(loader), n))


def _assert_batches_equal(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])


def _denormalize(image, config):
  return image * np.asarray(config.std, np.float32) + np.asarray(config.mean, np.float32)


def test_train_batch_shapes_and_dtypes(config):
  config.crop_size = (48, 40)
  (batch,) = _take(pipeline.create_train_loader(
      config, global_batch_size=4, seed=0, process_index=0, process_count=1), 1)
  assert batch.keys() == {'image', 'label'}
  assert batch['image'].shape == (4, 48, 40, 3) and batch['image'].dtype == np.float32
  assert batch['label'].shape == (4, 48, 40) and batch['label'].dtype == np.int32
  assert set(np.unique(batch['label']).tolist()) <= set(range(11)) | {255}


def test_train_loader_is_per_process_batch(config):
  (batch,) = _take(pipeline.create_train_loader(
      config, global_batch_size=8, seed=0, process_index=1, process_count=4), 1)
  assert batch['image'].shape[0] == 2


def test_crop_padding_uses_ignore_label_and_mean(config):
  # Scale 0.5: every 64x64 scene becomes 32x32, padded to the 64x64 crop.
  config.scale_range = (0.5, 0.5)
  config.color_jitter = 0.0
  (batch,) = _take(pipeline.create_train_loader(
      config, global_batch_size=4, seed=3, process_index=0, process_count=1), 1)
  label, image = batch['label'], batch['image']
  pad = np.ones((64, 64), bool)
  pad[:32, :32] = False
  assert (label[:, pad] == 255).all()
  assert (image[:, pad] == 0).all()  # Padded with the mean: 0 after normalising.
  assert (label[:, :32, :32] != 255).any()


def test_random_crop_window():
  image = np.arange(6 * 5 * 3, dtype=np.uint8).reshape(6, 5, 3)
  label = np.arange(30, dtype=np.int32).reshape(6, 5)
  crop = transforms.RandomCrop((4, 7), pad_value=(1, 2, 3), ignore_label=255)
  out = crop.random_map({'image': image, 'label': label}, np.random.default_rng(0))
  assert out['image'].shape == (4, 7, 3) and out['label'].shape == (4, 7)
  y0 = int(out['label'][0, 0]) // 5
  np.testing.assert_array_equal(out['label'][:, :5], label[y0:y0 + 4])
  np.testing.assert_array_equal(out['image'][:, :5], image[y0:y0 + 4])
  assert (out['label'][:, 5:] == 255).all()
  np.testing.assert_array_equal(out['image'][:, 5:], np.broadcast_to([1, 2, 3], (4, 2, 3)))


def test_random_scale_label_is_nearest():
  label = np.repeat(np.repeat(np.arange(4, dtype=np.int32).reshape(2, 2), 8, 0), 8, 1)
  image = np.zeros((16, 16, 3), np.uint8)
  out = transforms.RandomScale((1.5, 1.5)).random_map(
      {'image': image, 'label': label}, np.random.default_rng(0))
  assert out['label'].shape == (24, 24) and out['image'].shape == (24, 24, 3)
  # Nearest neighbour: each 12x12 quadrant keeps its single value.
  for q, (ys, xs) in enumerate(itertools.product([slice(0, 12), slice(12, 24)], repeat=2)):
    assert (out['label'][ys, xs] == q).all()


def test_horizontal_flip():
  image = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3)
  label = np.arange(6, dtype=np.int32).reshape(2, 3)
  out = transforms.RandomHorizontalFlip(1.0).random_map(
      {'image': image, 'label': label}, np.random.default_rng(0))
  np.testing.assert_array_equal(out['image'], image[:, ::-1])
  np.testing.assert_array_equal(out['label'], label[:, ::-1])
  same = transforms.RandomHorizontalFlip(0.0).random_map(
      {'image': image, 'label': label}, np.random.default_rng(0))
  np.testing.assert_array_equal(same['label'], label)


def test_color_jitter_range():
  image = np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8)
  out = transforms.ColorJitter(0.5).random_map(
      {'image': image, 'label': np.zeros((8, 8), np.int32)}, np.random.default_rng(1))
  assert out['image'].dtype == np.float32
  assert out['image'].min() >= 0 and out['image'].max() <= 255
  assert not np.allclose(out['image'], image)


def test_color_jitter_is_brightness_contrast_saturation_in_float64():
  image = np.random.default_rng(0).integers(0, 256, (9, 7, 3), dtype=np.uint8)
  out = transforms.ColorJitter(0.4).random_map(
      {'image': image, 'label': np.zeros((9, 7), np.int32)}, np.random.default_rng(5))
  b, c, s = np.random.default_rng(5).uniform(0.6, 1.4, size=3)
  luma = np.asarray([0.299, 0.587, 0.114])
  x = image.astype(np.float64) * b
  mean = (x @ luma).mean()
  x = (x - mean) * c + mean
  gray = (x @ luma)[..., None]
  x = np.clip(gray + (x - gray) * s, 0, 255)
  np.testing.assert_allclose(out['image'], x, rtol=0, atol=1e-3)


@pytest.mark.parametrize('size', [(5, 4), (64, 48), (3, 9)])
def test_normalize_equals_the_broadcast_formula_for_every_size(size):
  norm = transforms.Normalize((127.7, 126.9, 128.2), (57.9, 57.6, 58.1))
  norm.mean._max_sizes = norm.std._max_sizes = 2  # pylint: disable=protected-access
  rng = np.random.default_rng(0)
  for h, w in (size, (8, 8), (2, 3), size):  # more sizes than the cache keeps
    image = rng.integers(0, 256, (h, w, 3)).astype(np.float32)
    out = norm.map({'image': image})['image']
    mean = np.asarray((127.7, 126.9, 128.2), np.float32)
    std = np.asarray((57.9, 57.6, 58.1), np.float32)
    np.testing.assert_array_equal(out, (image - mean) / std)
  with pytest.raises(ValueError, match=r'expects an image \[H, W, 3\], got shape \(2, 4, 4, 3\)'):
    norm.map({'image': np.zeros((2, 4, 4, 3), np.float32)})


def test_padding_tiles_stay_the_pad_value_after_padded_outputs_are_written():
  crop = transforms.RandomCrop((6, 5), pad_value=(1.0, 2.0, 3.0), ignore_label=255)
  small = {'image': np.full((2, 2, 3), 9, np.uint8), 'label': np.zeros((2, 2), np.int32)}
  first = crop.random_map(small, np.random.default_rng(0))['image']
  first[...] = -1  # outputs are the caller's to change
  second = crop.random_map(small, np.random.default_rng(0))['image']
  np.testing.assert_array_equal(second[:2, :2], 9)
  np.testing.assert_array_equal(second[2:], np.broadcast_to([1.0, 2.0, 3.0], (4, 5, 3)))
  np.testing.assert_array_equal(second[:, 2:], np.broadcast_to([1.0, 2.0, 3.0], (6, 3, 3)))


def test_eval_padding_and_valid_mask(config, eval_records):
  config.eval_pad_size = (80, 72)
  batches = _take(pipeline.create_eval_loader(
      config, global_batch_size=2, process_index=0, process_count=1), 10)
  assert len(batches) == 5
  expected_valid = np.zeros((80, 72), bool)
  expected_valid[:64, :64] = True
  for j, batch in enumerate(batches):
    assert batch['image'].shape == (2, 80, 72, 3) and batch['image'].dtype == np.float32
    assert batch['label'].shape == (2, 80, 72) and batch['label'].dtype == np.int32
    assert batch['valid'].shape == (2, 80, 72) and batch['valid'].dtype == bool
    for k in range(2):
      record = eval_records[2 * j + k]  # Eval keeps the source order.
      np.testing.assert_array_equal(batch['valid'][k], expected_valid)
      np.testing.assert_array_equal(
          batch['label'][k, :64, :64], record['segmentation'][..., 0])
      assert (batch['label'][k][~expected_valid] == 255).all()
      assert (batch['image'][k][~expected_valid] == 0).all()
      np.testing.assert_allclose(
          _denormalize(batch['image'][k, :64, :64], config), record['image'], atol=1e-3)


def test_partial_last_eval_batch_is_padded(config):
  batches = _take(pipeline.create_eval_loader(
      config, global_batch_size=4, process_index=0, process_count=1), 100)
  assert len(batches) == 3  # ceil(10 / 4)
  for b in batches:
    assert b['image'].shape == (4, 64, 64, 3)
  last = batches[-1]
  assert last['valid'][:2].all() and not last['valid'][2:].any()
  assert (last['label'][2:] == 255).all() and (last['image'][2:] == 0).all()
  num_valid = sum(int(b['valid'].any(axis=(1, 2)).sum()) for b in batches)
  assert num_valid == NUM_EVAL


def _example_ids(batches, eval_records):
  """Index into eval_records of each valid example, by exact label-map match."""
  keys = {r['segmentation'][..., 0].tobytes(): i for i, r in enumerate(eval_records)}
  assert len(keys) == len(eval_records)
  ids = []
  for b in batches:
    for label, valid in zip(b['label'], b['valid']):
      if valid.any():
        ids.append(keys[label[:64, :64].astype(np.uint8).tobytes()])
  return ids


def test_eval_sharding_is_disjoint_and_complete(config, eval_records):
  per_process = [
      _take(pipeline.create_eval_loader(
          config, global_batch_size=4, process_index=p, process_count=2), 100)
      for p in range(2)
  ]
  # Same number of equally shaped batches on every process.
  assert len(per_process[0]) == len(per_process[1]) == 3
  for b in per_process[0] + per_process[1]:
    assert b['image'].shape == (2, 64, 64, 3)
  ids = [_example_ids(batches, eval_records) for batches in per_process]
  assert not set(ids[0]) & set(ids[1])
  assert sorted(ids[0] + ids[1]) == list(range(NUM_EVAL))


def test_eval_is_deterministic(config):
  a = _take(pipeline.create_eval_loader(
      config, global_batch_size=4, process_index=0, process_count=1), 100)
  b = _take(pipeline.create_eval_loader(
      config, global_batch_size=4, process_index=0, process_count=1), 100)
  _assert_batches_equal(a, b)


def test_train_is_deterministic_for_a_seed_with_or_without_reader_threads(config):
  def make(seed, prefetch=0):
    config.prefetch = prefetch
    return pipeline.create_train_loader(
        config, global_batch_size=4, seed=seed, process_index=0, process_count=1)

  a, b, c = _take(make(7), 3), _take(make(7, prefetch=16), 3), _take(make(8), 3)
  _assert_batches_equal(a, b)
  assert not np.array_equal(a[0]['image'], c[0]['image'])


def test_train_iterator_state_resume(config):
  loader = pipeline.create_train_loader(
      config, global_batch_size=4, seed=1, process_index=0, process_count=1)
  it = iter(loader)
  for _ in range(3):
    next(it)
  state = it.get_state()
  assert isinstance(state, bytes)
  json.loads(state.decode())  # JSON text, storable as a string in a checkpoint.
  expected = [next(it) for _ in range(2)]

  fresh = pipeline.create_train_loader(
      config, global_batch_size=4, seed=1, process_index=0, process_count=1)
  resumed = iter(fresh)
  resumed.set_state(state)
  _assert_batches_equal([next(resumed) for _ in range(2)], expected)


def test_train_runs_past_an_epoch(config):
  batches = _take(pipeline.create_train_loader(
      config, global_batch_size=8, seed=0, process_index=0, process_count=1), 6)
  assert len(batches) == 6  # 48 examples from a 40-example split: repeats.


def test_decode_rejects_bad_images():
  decode = transforms.DecodeExample('image', 'segmentation', num_classes=11)
  label = np.zeros((8, 8, 1), np.uint8)
  with pytest.raises(ValueError, match=r'\[H, W, 3\].*\(8, 8, 2\)'):
    decode.map({'image': np.zeros((8, 8, 2), np.uint8), 'segmentation': label})
  with pytest.raises(ValueError, match='uint8.*float32'):
    decode.map({'image': np.zeros((8, 8, 3), np.float32), 'segmentation': label})
  with pytest.raises(ValueError, match=r'\(8, 9, 1\).*\(8, 8, 3\)'):
    decode.map({'image': np.zeros((8, 8, 3), np.uint8),
                'segmentation': np.zeros((8, 9, 1), np.uint8)})
  with pytest.raises(ValueError, match='Label value 12 out of range.*0..10.*255'):
    decode.map({'image': np.zeros((8, 8, 3), np.uint8),
                'segmentation': np.full((8, 8, 1), 12, np.uint8)})
  with pytest.raises(ValueError, match="no feature 'segmentation'.*'image', 'mask'"):
    decode.map({'image': np.zeros((8, 8, 3), np.uint8), 'mask': label})


def test_eval_image_larger_than_pad_size_raises(config):
  pad = transforms.PadToSize((32, 64))
  with pytest.raises(ValueError, match=r'\(64, 64\).*eval_pad_size \(32, 64\)'):
    pad.map({'image': np.zeros((64, 64, 3), np.uint8),
             'label': np.zeros((64, 64), np.int32)})
  config.eval_pad_size = (32, 32)
  loader = pipeline.create_eval_loader(
      config, global_batch_size=2, process_index=0, process_count=1)
  with pytest.raises(ValueError, match='eval_pad_size'):
    next(iter(loader))


def test_bad_config_raises(config):
  with pytest.raises(ValueError, match='global_batch_size 6.*process_count 4'):
    pipeline.create_train_loader(
        config, global_batch_size=6, seed=0, process_index=0, process_count=4)
  with pytest.raises(ValueError, match='global_batch_size 3.*process_count 2'):
    pipeline.create_eval_loader(
        config, global_batch_size=3, process_index=0, process_count=2)
  with pytest.raises(ValueError, match='crop_size.*-1'):
    config.crop_size = (64, -1)
    pipeline.create_train_loader(
        config, global_batch_size=2, seed=0, process_index=0, process_count=1)
  config.crop_size = (64, 64)
  config.name = 'nope'
  with pytest.raises(ValueError, match="Unknown dataset 'nope'"):
    pipeline.create_eval_loader(
        config, global_batch_size=2, process_index=0, process_count=1)
  del config['std']
  with pytest.raises(ValueError, match=r"lacks fields \['std'\]"):
    pipeline.create_eval_loader(
        config, global_batch_size=2, process_index=0, process_count=1)


def test_worker_processes_yield_the_one_process_batches(config, eval_records):
  """grain's workers each batch their own records; without `WorkerBatchOrder`, batch 0
  with 2 workers held train records 0, 2, 4, 6 (and an eval split lost the records of
  each worker's partial batch). Now: the same batches for 0 and 2 workers, a resume
  with workers continues them, and eval reads every record once."""
  def train(workers):
    config.num_workers = workers
    return pipeline.create_train_loader(config, global_batch_size=4, seed=3,
                                        process_index=0, process_count=1)

  expected = _take(train(0), 6)
  it = iter(train(2))
  _assert_batches_equal([next(it) for _ in range(3)], expected[:3])
  state = it.get_state()
  resumed = iter(train(2))
  resumed.set_state(state)
  _assert_batches_equal([next(resumed) for _ in range(3)], expected[3:])

  config.num_workers = 0
  one = _take(pipeline.create_eval_loader(config, global_batch_size=4, process_index=0,
                                          process_count=1), 100)
  config.num_workers = 2
  two = _take(pipeline.create_eval_loader(config, global_batch_size=4, process_index=0,
                                          process_count=1), 100)
  assert len(one) == 3 and len(two) == 4  # 10 records: 3 batches, padded to 2 per worker
  _assert_batches_equal(two[:3], one)
  assert not two[3]['valid'].any()
  assert sorted(_example_ids(two, eval_records)) == list(range(NUM_EVAL))
  assert pipeline.eval_padded_size(10, 4, 2) == 16 and pipeline.eval_padded_size(8, 4, 0) == 8
