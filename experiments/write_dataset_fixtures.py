"""Writes the tests' tiny VOC+SBD, COCO and Cityscapes downloads (real formats) under a folder,
for smoke runs of `segjax.data.build` and `segjax.main` without the real data.

  python experiments/write_dataset_fixtures.py /tmp/fixtures
"""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..', 'tests'))

import test_data_cityscapes  # pylint: disable=wrong-import-position
import test_data_coco  # pylint: disable=wrong-import-position
import test_data_voc  # pylint: disable=wrong-import-position

if __name__ == '__main__':
  root = sys.argv[1]
  print(test_data_voc.write_voc(os.path.join(root, 'voc')))
  print(test_data_coco.write_coco(os.path.join(root, 'coco')))
  print(test_data_cityscapes.write_cityscapes(os.path.join(root, 'cityscapes')))
