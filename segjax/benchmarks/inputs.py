"""The synthetic inputs both sides of a comparison run on (numpy, NHWC; torch transposes).

Semantic: normal(0, 1) images (already "normalised") and uniform labels in
[0, num_classes). Instance: `num_instances` boxes per image, log-uniform 32..H/2 pixels
per side, each with the filled box as its mask and a class in 1..num_classes-1; the
rest of the `max_instances` slots are padding (segjax) and absent (torchvision).
"""

from __future__ import annotations

import numpy as np


def semantic_batch(batch_size: int, image_size: tuple[int, int], num_classes: int,
                   seed: int = 0) -> dict[str, np.ndarray]:
  rng = np.random.default_rng(seed)
  height, width = image_size
  return {
      'image': rng.normal(size=(batch_size, height, width, 3)).astype(np.float32),
      'label': rng.integers(0, num_classes, size=(batch_size, height, width)).astype(np.int32),
  }


def instance_batch(batch_size: int, image_size: tuple[int, int], num_classes: int,
                   max_instances: int, num_instances: int = 4,
                   seed: int = 0) -> dict[str, np.ndarray]:
  """The `segjax.data.instance_pipeline` batch layout (see there), synthetic."""
  if not 1 <= num_instances <= max_instances:
    raise ValueError(f'num_instances={num_instances} must be in [1, max_instances='
                     f'{max_instances}]')
  rng = np.random.default_rng(seed)
  height, width = image_size
  b, m = batch_size, max_instances
  boxes = np.zeros((b, m, 4), np.float32)
  labels = np.zeros((b, m), np.int32)
  valid = np.zeros((b, m), bool)
  masks = np.zeros((b, m, height, width), np.uint8)
  for i in range(b):
    for j in range(num_instances):
      h, w = np.exp(rng.uniform(np.log(32), np.log(min(height, width) / 2), size=2))
      y1, x1 = rng.uniform(0, height - h), rng.uniform(0, width - w)
      y2, x2 = y1 + h, x1 + w
      boxes[i, j] = (x1, y1, x2, y2)
      labels[i, j] = rng.integers(1, num_classes)
      valid[i, j] = True
      masks[i, j, int(y1):int(np.ceil(y2)), int(x1):int(np.ceil(x2))] = 1
  return {
      'image': rng.normal(size=(b, height, width, 3)).astype(np.float32),
      'image_size': np.tile(np.asarray([height, width], np.int32), (b, 1)),
      'gt_boxes': boxes, 'gt_labels': labels, 'gt_valid': valid, 'gt_masks': masks,
  }
