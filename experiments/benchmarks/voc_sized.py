"""A VOC-sized `voc_segmentation` build for timing the input pipeline on full-size JPEGs.

Writes a VOCdevkit of synthetic 500x375 photos-like JPEGs (smooth gradients plus noise,
quality 90) with palette-PNG class and object labels, then builds it with segjax's
builder. The pipeline rows in README.md ("Input pipeline in one thread") read it:

  python experiments/benchmarks/voc_sized.py /tmp/voc_sized
  python -m segjax.benchmark --workload=pipeline --config=configs/fcn8s.py:voc \
      --config.dataset.name=voc_segmentation --config.dataset.train_split=train \
      --config.dataset.data_dir=/tmp/voc_sized/tfds --batch_size=8 --steps=20 \
      --config.dataset.prefetch=16   # and =0
"""

from __future__ import annotations

import os
import sys

import numpy as np
from PIL import Image

from segjax.data import build

HEIGHT, WIDTH = 375, 500  # a typical VOC 2012 image
NUM_TRAIN, NUM_VAL = 64, 16


def _save_palette_png(array: np.ndarray, path: str) -> None:
  image = Image.fromarray(array, mode='P')
  image.putpalette([v for i in range(256) for v in ((i * 37) % 256, (i * 91) % 256, i)])
  image.save(path)


def write_devkit(root: str) -> str:
  """Writes root/VOCdevkit and returns its path."""
  voc = os.path.join(root, 'VOCdevkit', 'VOC2012')
  for sub in ('JPEGImages', 'SegmentationClass', 'SegmentationObject',
              'ImageSets/Segmentation'):
    os.makedirs(os.path.join(voc, sub), exist_ok=True)
  rng = np.random.default_rng(0)
  yy, xx = np.mgrid[0:HEIGHT, 0:WIDTH]
  names = [f'2007_{i:06d}' for i in range(1, NUM_TRAIN + NUM_VAL + 1)]
  for i, name in enumerate(names):
    base = np.sin(xx / (20 + i)) * 60 + np.cos(yy / (15 + i % 7)) * 60 + 128
    photo = np.stack([base, base[::-1], base[:, ::-1]], -1) + rng.normal(0, 12, base.shape + (3,))
    Image.fromarray(np.clip(photo, 0, 255).astype(np.uint8)).save(
        os.path.join(voc, 'JPEGImages', name + '.jpg'), quality=90)
    semantic = np.zeros((HEIGHT, WIDTH), np.uint8)
    semantic[50:200, 60:300] = 1 + i % 20
    semantic[48:50] = 255  # a void rim
    objects = np.where(semantic == 255, 255, (semantic > 0).astype(np.uint8)).astype(np.uint8)
    _save_palette_png(semantic, os.path.join(voc, 'SegmentationClass', name + '.png'))
    _save_palette_png(objects, os.path.join(voc, 'SegmentationObject', name + '.png'))
  for split, ids in (('train', names[:NUM_TRAIN]), ('val', names[NUM_TRAIN:])):
    with open(os.path.join(voc, 'ImageSets', 'Segmentation', split + '.txt'), 'w') as f:
      f.write(''.join(n + '\n' for n in ids))
  return os.path.join(root, 'VOCdevkit')


def main(root: str) -> None:
  devkit = write_devkit(root)
  build.build_dataset('voc_segmentation', devkit, os.path.join(root, 'tfds'), num_threads=2)
  print(f'voc_segmentation built in {os.path.join(root, "tfds")}')


if __name__ == '__main__':
  if len(sys.argv) != 2:
    sys.exit('usage: python experiments/benchmarks/voc_sized.py OUTPUT_DIR')
  main(sys.argv[1])
