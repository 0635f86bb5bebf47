"""cityscapes_semantic: a tiny leftImg8bit + gtFine tree, labelIds -> the 19 train ids."""

import os

import numpy as np
import pytest
from PIL import Image

from segjax.data import build, cityscapes, manual_files, sources

H, W = 32, 48
# (split folder, city, stem) of the fixture images.
FILES = [('train', 'aachen', 'aachen_000000_000019'), ('train', 'aachen', 'aachen_000001_000019'),
         ('train', 'bochum', 'bochum_000000_000313'), ('val', 'lindau', 'lindau_000000_000019')]


def label_ids(index: int) -> np.ndarray:
  """Every labelId 0..33 appears, in a different arrangement per image."""
  return np.roll(np.arange(H * W) % cityscapes.NUM_LABEL_IDS, 7 * index).reshape(H, W).astype(
      np.uint8)


def write_cityscapes(root: str) -> str:
  rng = np.random.default_rng(0)
  for i, (folder, city, stem) in enumerate(FILES):
    for top in ('leftImg8bit', 'gtFine'):
      os.makedirs(os.path.join(root, top, folder, city), exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (H, W, 3), dtype=np.uint8)).save(
        os.path.join(root, 'leftImg8bit', folder, city, stem + '_leftImg8bit.png'))
    Image.fromarray(label_ids(i), mode='L').save(
        os.path.join(root, 'gtFine', folder, city, stem + '_gtFine_labelIds.png'))
  return root


def test_train_id_table():
  # cityscapesScripts labels.py, spelled out: road 7 -> 0 ... bicycle 33 -> 18.
  table = cityscapes.train_id_lookup()
  expected = {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10,
              24: 11, 25: 12, 26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18}
  for label_id in range(34):
    assert table[label_id] == expected.get(label_id, 255), label_id
  # Ignored on purpose: unlabeled..ground, parking, rail track, guard rail, bridge,
  # tunnel, polegroup, caravan, trailer.
  assert [i for i in range(34) if table[i] == 255] == [0, 1, 2, 3, 4, 5, 6, 9, 10, 14, 15, 16,
                                                       18, 29, 30]


@pytest.fixture(scope='module')
def built(tmp_path_factory):
  root = write_cityscapes(str(tmp_path_factory.mktemp('cityscapes_files')))
  data_dir = str(tmp_path_factory.mktemp('cityscapes_tfds'))
  build.build_dataset('cityscapes_semantic', root, data_dir, num_threads=2)
  return root, data_dir


def test_splits_images_and_train_ids(built):
  root, data_dir = built
  seen = {}
  for split, folder in (('train', 'train'), ('validation', 'val')):
    source = sources.load_data_source('cityscapes_semantic', split, data_dir)
    for r in (source[i] for i in range(len(source))):
      stem = r['file_name'].decode() if isinstance(r['file_name'], bytes) else r['file_name']
      seen[stem] = split
      i = [f[2] for f in FILES].index(stem)
      assert FILES[i][0] == folder
      image_path = os.path.join(root, 'leftImg8bit', folder, FILES[i][1],
                                stem + '_leftImg8bit.png')
      np.testing.assert_array_equal(r['image'], np.asarray(Image.open(image_path)))
      seg = r['segmentation'][..., 0]
      np.testing.assert_array_equal(seg, cityscapes.train_id_lookup()[label_ids(i)])
      ids = label_ids(i)
      assert (seg[ids == 26] == 13).all() and (seg[ids == 6] == 255).all()  # car; ground
  assert seen == {'aachen_000000_000019': 'train', 'aachen_000001_000019': 'train',
                  'bochum_000000_000313': 'train', 'lindau_000000_000019': 'validation'}
  meta = sources.get_metadata('cityscapes_semantic')
  assert meta.num_classes == 19 and meta.ignore_label == 255 and meta.class_names[13] == 'car'


def test_missing_label_names_it(tmp_path):
  root = write_cityscapes(str(tmp_path / 'files'))
  os.remove(os.path.join(root, 'gtFine', 'val', 'lindau',
                         'lindau_000000_000019_gtFine_labelIds.png'))
  with pytest.raises(manual_files.ManualFilesError,
                     match='lindau_000000_000019_gtFine_labelIds.png: no such file'):
    build.build_dataset('cityscapes_semantic', root, str(tmp_path / 'tfds'))


def test_unknown_label_id_raises_naming_the_file(tmp_path):
  root = write_cityscapes(str(tmp_path / 'files'))
  bad = label_ids(0)
  bad[3, 3] = 34
  Image.fromarray(bad, mode='L').save(os.path.join(
      root, 'gtFine', 'train', 'aachen', 'aachen_000000_000019_gtFine_labelIds.png'))
  with pytest.raises(manual_files.BadExampleError,
                     match=r'aachen_000000_000019_gtFine_labelIds.png: unknown labelId \[34\]; '
                           r'expected values in 0-33'):
    build.build_dataset('cityscapes_semantic', root, str(tmp_path / 'tfds'), num_threads=1)
