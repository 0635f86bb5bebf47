"""`cityscapes_semantic`: Cityscapes fine annotations as the 19 train ids, no TensorFlow.

Layout (`--manual_dir`, from leftImg8bit_trainvaltest.zip and gtFine_trainvaltest.zip):
  leftImg8bit/{train,val}/<city>/<city>_<seq>_<frame>_leftImg8bit.png
  gtFine/{train,val}/<city>/<city>_<seq>_<frame>_gtFine_labelIds.png

Splits: train (2,975 images), validation (val, 500). The test split has no public labels
and is not built.

Features (1024 x 2048 in the official data):
  image          uint8 [H, W, 3]: the original PNG bytes
  segmentation   uint8 [H, W, 1]: train ids 0..18 (`CLASS_NAMES`), 255 = ignore; mapped
                 from gtFine's labelIds with `LABEL_ID_TO_TRAIN_ID` (the table of
                 cityscapesScripts' labels.py: every label whose trainId is 255 or -1
                 becomes 255)
  image_id       int64: the image's index in the split's sorted file list
  file_name      '<city>_<seq>_<frame>'

Bad inputs: a missing leftImg8bit/ or gtFine/ split folder, a split without images, or
an image without its labelIds PNG stops the build naming the path. A corrupt image, a
labelIds PNG of another size or a labelId outside 0-33 raises `BadExampleError` naming
the file, or with `--skip_bad_examples` is logged, counted and skipped.
"""

from __future__ import annotations

import os

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from segjax.data import manual_files
from segjax.data.manual_files import ManualFilesError

CLASS_NAMES = ('road', 'sidewalk', 'building', 'wall', 'fence', 'pole', 'traffic light',
               'traffic sign', 'vegetation', 'terrain', 'sky', 'person', 'rider', 'car',
               'truck', 'bus', 'train', 'motorcycle', 'bicycle')
NUM_CLASSES = len(CLASS_NAMES)  # 19; no background class, the rest is ignored
IGNORE_LABEL = 255
# labelId -> trainId, cityscapesScripts helpers/labels.py (ids 0-33).
LABEL_ID_TO_TRAIN_ID = {
    7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10, 24: 11,
    25: 12, 26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18,
}
NUM_LABEL_IDS = 34
SPLITS = {'train': 'train', 'validation': 'val'}
_IMAGE_SUFFIX = '_leftImg8bit.png'
_LABEL_SUFFIX = '_gtFine_labelIds.png'


def train_id_lookup() -> np.ndarray:
  """uint8 [256]: labelId -> trainId (255 for ignored and undefined ids)."""
  table = np.full(256, IGNORE_LABEL, np.uint8)
  for label_id, train_id in LABEL_ID_TO_TRAIN_ID.items():
    table[label_id] = train_id
  return table


_LOOKUP = train_id_lookup()


def to_train_ids(label_ids: np.ndarray) -> np.ndarray:
  """uint8 [H, W] labelIds -> uint8 [H, W] trainIds."""
  return _LOOKUP[label_ids]


class CityscapesSemantic(manual_files.ManualBuilder):
  """Cityscapes gtFine semantic segmentation, 19 train ids."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Initial release.'}
  MANUAL_DOWNLOAD_INSTRUCTIONS = """
  leftImg8bit/{train,val}/ and gtFine/{train,val}/ (leftImg8bit_trainvaltest.zip,
  gtFine_trainvaltest.zip from cityscapes-dataset.com) in --manual_dir.
  """
  code_path = epath.Path(__file__)

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description='Cityscapes fine semantic segmentation, labelIds mapped to 19 train ids.',
        features=tfds.features.FeaturesDict({
            'image': tfds.features.Image(shape=(None, None, 3)),
            'segmentation': tfds.features.Image(shape=(None, None, 1)),
            'image_id': np.int64,
            'file_name': tfds.features.Text(),
        }),
        supervised_keys=('image', 'segmentation'),
        homepage='https://www.cityscapes-dataset.com',
        metadata=tfds.core.MetadataDict(),
    )

  def _split_generators(self, dl_manager):
    manual_dir = self._manual_root(dl_manager)
    return {split: self._generate_examples(split, self._items(manual_dir, folder))
            for split, folder in SPLITS.items()}

  def _items(self, manual_dir: str, folder: str) -> list[tuple]:
    images = manual_files.require_dir(os.path.join(manual_dir, 'leftImg8bit', folder),
                                      f'the Cityscapes {folder} images')
    labels = manual_files.require_dir(os.path.join(manual_dir, 'gtFine', folder),
                                      f'the Cityscapes {folder} gtFine labels')
    items = []
    for city in sorted(os.listdir(images)):
      if not os.path.isdir(os.path.join(images, city)):
        continue
      for file in sorted(os.listdir(os.path.join(images, city))):
        if not file.endswith(_IMAGE_SUFFIX):
          continue
        stem = file[:-len(_IMAGE_SUFFIX)]
        label = os.path.join(labels, city, stem + _LABEL_SUFFIX)
        manual_files.require_file(label, f'the labelIds PNG of {file}')
        items.append((len(items), stem, os.path.join(images, city, file), label))
    if not items:
      raise ManualFilesError(f'No *{_IMAGE_SUFFIX} files in {images}/<city>/; expected the '
                             'Cityscapes images.')
    return items

  def _load(self, item: tuple) -> tuple[str, dict]:
    index, stem, image_path, label_path = item
    image_bytes, h, w = manual_files.read_rgb_image(image_path)
    label_ids = manual_files.read_png_indices(label_path, 'the labelIds PNG', palette=False)
    manual_files.check_same_size(label_path, label_ids.shape, image_path, (h, w))
    manual_files.check_values(label_path, label_ids, range(NUM_LABEL_IDS), 'labelId')
    return stem, {
        'image': image_bytes,
        'segmentation': manual_files.encode_png(to_train_ids(label_ids)),
        'image_id': index,
        'file_name': stem,
    }
