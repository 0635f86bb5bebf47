"""How much mIoU a prediction at stride s can reach on digit_scenes, given a perfect model.

  python experiments/resolution_oracle.py [--data_dir=DIR]

The "oracle" averages the one-hot ground truth over s x s blocks (what a perfect
stride-s classifier could output as class probabilities), upsamples it bilinearly back
to 64x64 and takes the argmax, then scores that against the ground truth with the
evaluation's mIoU (ignore pixels left out; counted as background inside the average).
A learned upsampling (FCN's deconvolutions fed by skips) can beat it, but it shows why
a stride-8 FCN-8s stays far below a stride-2 one on 2-4 px digit strokes.
"""

from __future__ import annotations

import argparse
import json

import jax
import numpy as np

from segjax.data import digit_scenes, sources
from segjax.evaluation import boundary, segmentation_metrics


def oracle_miou(labels: np.ndarray, stride: int, num_classes: int, ignore: int) -> float:
  n, h, w = labels.shape
  onehot = np.eye(num_classes, dtype=np.float32)[np.where(labels == ignore, 0, labels)]
  small = onehot.reshape(n, h // stride, stride, w // stride, stride, num_classes).mean((2, 4))
  up = np.asarray(jax.image.resize(small, (n, h, w, num_classes), 'bilinear'))
  pred = up.argmax(-1)
  confusion = boundary.confusion_counts(pred, labels, labels != ignore, num_classes)
  return segmentation_metrics.metrics_from_confusion(confusion)['miou']


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--data_dir', default=None)
  parser.add_argument('--split', default='validation')
  args = parser.parse_args()
  source = sources.load_data_source('digit_scenes', args.split, args.data_dir)
  labels = np.stack([source[i]['segmentation'][..., 0] for i in range(len(source))])
  for stride in (1, 2, 4, 8, 16, 32):
    miou = oracle_miou(labels, stride, digit_scenes.NUM_CLASSES, digit_scenes.IGNORE_LABEL)
    print(json.dumps({'stride': stride, 'oracle_miou': round(miou, 4)}))


if __name__ == '__main__':
  main()
