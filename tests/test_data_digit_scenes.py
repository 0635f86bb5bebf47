"""Tests for the digit_scenes TFDS builder and `segjax.data.sources`."""

import os
import subprocess
import sys

import numpy as np
import pytest

from segjax.data import digit_scenes
from segjax.data import sources

SPLIT_SIZES = {'train': 40, 'validation': 10, 'test': 10}  # The `tiny` config.


@pytest.fixture(scope='module')
def records(data_dir):
  return {
      split: [
          sources.load_data_source('digit_scenes/tiny', split, data_dir)[i]
          for i in range(n)
      ]
      for split, n in SPLIT_SIZES.items()
  }


def test_split_sizes(data_dir):
  for split, n in SPLIT_SIZES.items():
    assert len(sources.load_data_source('digit_scenes/tiny', split, data_dir)) == n


def test_shapes_dtypes_and_label_values(records):
  allowed = set(range(11)) | {255}
  for split_records in records.values():
    for r in split_records:
      assert r['image'].shape == (64, 64, 3) and r['image'].dtype == np.uint8
      seg = r['segmentation']
      assert seg.shape == (64, 64, 1) and seg.dtype == np.uint8
      assert set(np.unique(seg).tolist()) <= allowed
      objs = r['objects']
      n = len(objs['label'])
      assert 1 <= n <= digit_scenes.MAX_DIGITS
      assert len(objs['bbox']) == len(objs['mask']) == n
      for m in objs['mask']:
        assert m.shape == (64, 64, 1) and m.dtype == np.uint8
        assert set(np.unique(m).tolist()) <= {0, 1}
        assert m.sum() >= digit_scenes.MIN_VISIBLE_PIXELS
      assert all(0 <= int(l) <= 9 for l in objs['label'])


def test_image_ids_cover_split(records):
  for split, n in SPLIT_SIZES.items():
    assert sorted(int(r['image_id']) for r in records[split]) == list(range(n))


def test_instance_masks_agree_with_semantic_mask(records):
  num_checked = 0
  for r in records['train']:
    seg = r['segmentation'][..., 0].astype(int)
    masks = np.stack([m[..., 0] for m in r['objects']['mask']]).astype(bool)
    labels = np.asarray(r['objects']['label'], int)
    # Visible masks never overlap: occluded pixels belong to the top digit only.
    assert masks.sum(0).max() <= 1
    for m, c in zip(masks, labels):
      # Where an instance is visible, the semantic mask is its class or ignore ...
      assert set(np.unique(seg[m]).tolist()) <= {c + 1, 255}
      # ... and mostly its class: the ignore rim is thin.
      assert (seg[m] == c + 1).mean() > 0.5
      num_checked += 1
    # Every pixel of semantic class k lies in an instance of digit k - 1.
    instance_class = np.zeros((64, 64), int)
    for m, c in zip(masks, labels):
      instance_class[m] = c + 1
    labelled = (seg > 0) & (seg < 255)
    np.testing.assert_array_equal(seg[labelled], instance_class[labelled])
    # Pixels outside any instance are background or ignore.
    assert set(np.unique(seg[~masks.any(0)]).tolist()) <= {0, 255}
  assert num_checked >= 40


def test_ignore_band_is_thin(records):
  segs = np.stack([r['segmentation'] for r in records['train']])
  num_ignore = (segs == 255).sum()
  num_digit = ((segs > 0) & (segs < 255)).sum()
  assert 0 < num_ignore < 0.35 * num_digit


def test_bboxes_match_masks(records):
  for r in records['train'] + records['validation']:
    for bbox, m in zip(r['objects']['bbox'], r['objects']['mask']):
      rows = np.flatnonzero(m[..., 0].any(1))
      cols = np.flatnonzero(m[..., 0].any(0))
      expected = np.asarray(
          [rows[0], cols[0], rows[-1] + 1, cols[-1] + 1], np.float32
      ) / 64
      np.testing.assert_allclose(bbox, expected, atol=1e-6)


def test_records_equal_render_scene(records):
  """Stored scene i of each split is exactly what its seeded generator draws."""
  for split in ('train', 'test'):
    for r in records[split][:3]:
      i = int(r['image_id'])
      scene = digit_scenes.render_scene(
          digit_scenes.scene_rng(0, split, i),
          digit_scenes.source_digit_indices(split),
      )
      np.testing.assert_array_equal(r['image'], scene['image'])
      np.testing.assert_array_equal(r['segmentation'][..., 0], scene['segmentation'])
      np.testing.assert_array_equal(r['objects']['label'], scene['labels'])


def test_build_is_deterministic(data_dir, records, tmp_path):
  other = sources.load_data_source('digit_scenes/tiny', 'validation', str(tmp_path))
  for i in range(3):
    a, b = records['validation'][i], other[i]
    assert int(a['image_id']) == int(b['image_id'])
    np.testing.assert_array_equal(a['image'], b['image'])
    np.testing.assert_array_equal(a['segmentation'], b['segmentation'])
    for ma, mb in zip(a['objects']['mask'], b['objects']['mask']):
      np.testing.assert_array_equal(ma, mb)


def test_source_digit_splits_are_disjoint():
  parts = [set(digit_scenes.source_digit_indices(s).tolist()) for s in SPLIT_SIZES]
  assert not parts[0] & parts[1] and not parts[0] & parts[2]
  assert not parts[1] & parts[2]
  assert set.union(*parts) == set(range(1797))
  assert len(parts[1]) >= 200 and len(parts[2]) >= 200
  with pytest.raises(ValueError, match="'val'.*validation"):
    digit_scenes.source_digit_indices('val')


def test_scenes_draw_only_their_splits_digits(monkeypatch, tmp_path):
  seen = []
  real_render = digit_scenes.render_scene

  def spy(rng, digit_indices):
    seen.append(set(np.asarray(digit_indices).tolist()))
    return real_render(rng, digit_indices)

  monkeypatch.setattr(digit_scenes, 'render_scene', spy)
  builder = digit_scenes.DigitScenes(config='tiny', data_dir=str(tmp_path))
  for split in ('validation', 'test'):
    seen.clear()
    examples = list(builder._generate_examples(split, 2))
    assert len(examples) == 2
    lo, hi = digit_scenes.SOURCE_DIGIT_RANGES[split]
    assert seen == [set(range(lo, hi))] * 2


def test_not_rebuilt_when_present(data_dir, monkeypatch):
  files = [
      os.path.join(root, f)
      for root, _, fs in os.walk(data_dir)
      for f in fs
      if 'array_record' in f
  ]
  assert len(files) == 3
  mtimes = [os.path.getmtime(f) for f in files]

  def fail(*args, **kwargs):
    raise AssertionError('download_and_prepare called on a prepared dataset')

  monkeypatch.setattr(digit_scenes.DigitScenes, 'download_and_prepare', fail)
  source = sources.load_data_source('digit_scenes/tiny', 'train', data_dir)
  assert len(source) == 40
  assert [os.path.getmtime(f) for f in files] == mtimes


def test_custom_sizes_via_config(tmp_path):
  config = digit_scenes.DigitScenesConfig(
      name='t2', num_train=2, num_validation=1, num_test=1
  )
  builder = digit_scenes.DigitScenes(
      config=config, data_dir=str(tmp_path), file_format='array_record'
  )
  builder.download_and_prepare(file_format='array_record')
  assert len(builder.as_data_source('train')) == 2
  assert len(builder.as_data_source('test')) == 1


@pytest.mark.parametrize(
    'name, split, match',
    [
        ('digit_scene', 'train', r"Unknown dataset 'digit_scene'.*digit_scenes"),
        ('digit_scenes/tiny', 'val', r"Unknown split 'val'.*'validation'"),
        ('digit_scenes/huge', 'train', r"Unknown config 'huge'.*'tiny'"),
    ],
)
def test_bad_names_raise(data_dir, name, split, match):
  with pytest.raises(ValueError, match=match):
    sources.load_data_source(name, split, data_dir)


def test_metadata():
  meta = sources.get_metadata('digit_scenes/tiny')
  assert meta.num_classes == 11 == len(meta.class_names)
  assert meta.class_names[:3] == ('background', '0', '1')
  assert meta.ignore_label == 255
  assert sources.DATASETS['digit_scenes'] is digit_scenes.DigitScenes


def test_build_and_read_without_tensorflow(tmp_path):
  code = (
      'import sys\n'
      'from segjax.data import sources\n'
      f'src = sources.load_data_source("digit_scenes/tiny", "test", {str(tmp_path)!r})\n'
      'r = src[0]\n'
      'assert r["image"].shape == (64, 64, 3)\n'
      'assert "tensorflow" not in sys.modules, "tensorflow was imported"\n'
  )
  result = subprocess.run(
      [sys.executable, '-c', code], capture_output=True, text=True, timeout=120
  )
  assert result.returncode == 0, result.stderr[-2000:]


def test_only_the_requested_features_are_decoded(data_dir):
  full = sources.load_data_source('digit_scenes/tiny', 'train', data_dir)
  part = sources.load_data_source('digit_scenes/tiny', 'train', data_dir,
                                  features=('image', 'segmentation'))
  for i in (0, 7):
    np.testing.assert_array_equal(part[i]['image'], full[i]['image'])
    np.testing.assert_array_equal(part[i]['segmentation'], full[i]['segmentation'])
    decoded = full[i]['objects']['mask']
    assert len(decoded) >= 1 and decoded[0].shape == (64, 64, 1)
    stored = part[i]['objects']['mask']  # the masks' PNG bytes, one per object
    assert len(stored) == len(decoded)
    assert all(bytes(png).startswith(b'\x89PNG') for png in stored)
