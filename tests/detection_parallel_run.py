"""Run by test_mask_rcnn.py in a subprocess with 2 simulated CPU devices.

Trains the same tiny Mask R-CNN (ResNet-18 at 1/8 width, so BatchNorm statistics must
be synced across devices) for a few SGD steps on one fixed batch of two 64x64 images
three ways: one device (`detection_trainer.train_step`, axis_name=None), the pmap
driver (one image per device) and the jit driver over a 2-device mesh. Prints, as the
last stdout line, the JSON
  {"losses": {"single": [...], "pmap": [...], "jit": [...]},
   "pmap_params_diff": d, "jit_params_diff": d, "param_change": d}
where the diffs are the max |final params - single's final params| and param_change
is the max |single's final params - initial params|.
"""

import json
import os
import sys

os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=2')

import jax  # pylint: disable=g-import-not-at-top
import numpy as np

from segjax import detection_config
from segjax.train import checkpoints, detection_trainer, parallel
from test_mask_rcnn import NUM_CLASSES, tiny_config

NUM_STEPS = 3
# 64, not 32: at 32x32 res5 is 1x1, so its BatchNorm normalises 2 values per channel;
# its output is then ~+-1 whatever the input, and the gradient through it is rounding
# noise amplified by 1/sigma (grad norm ~400, drivers differing by ~1%).
SIZE = 64
BATCH = 2  # one image per device
MAX_INSTANCES = 3


def make_config(parallel_kind: str):
  config = detection_config.get_detection_base_config('mask_rcnn')
  config.parallel = parallel_kind
  config.model = tiny_config('mask_rcnn')
  config.dataset.num_classes = NUM_CLASSES
  config.dataset.pad_size = (SIZE, SIZE)
  config.dataset.max_instances = MAX_INSTANCES
  config.batch_size = BATCH
  config.num_train_steps = NUM_STEPS
  # SGD, not Adam: Adam's g / sqrt(v) turns rounding noise in near-zero gradients into
  # lr-sized steps, which would compare rounding rather than the drivers.
  o = config.optimizer
  o.name, o.learning_rate, o.momentum, o.weight_decay = 'sgd', 0.02, 0.9, 0.0
  o.schedule, o.warmup_steps = 'constant', 0
  return config


def fixed_batch():
  """Two images in the `instance_pipeline` batch layout; image 1 is smaller than the
  padding and holds two objects, image 0 one (unequal per-device ground-truth counts)."""
  rng = np.random.default_rng(0)
  m = MAX_INSTANCES
  batch = {
      'image': rng.normal(size=(BATCH, SIZE, SIZE, 3)).astype(np.float32),
      'image_size': np.asarray([[SIZE, SIZE], [56, 48]], np.int32),
      'gt_boxes': np.zeros((BATCH, m, 4), np.float32),
      'gt_labels': np.zeros((BATCH, m), np.int32),
      'gt_valid': np.zeros((BATCH, m), bool),
      'gt_masks': np.zeros((BATCH, m, SIZE, SIZE), np.uint8),
  }
  h, w = batch['image_size'][1]
  batch['image'][1, h:] = 0.0  # padding region of image 1 (0 after Normalize)
  batch['image'][1, :, w:] = 0.0
  objects = [(0, 0, (8, 12, 40, 52), 2), (1, 0, (4, 6, 28, 34), 1), (1, 1, (24, 20, 46, 54), 3)]
  for i, j, (x1, y1, x2, y2), label in objects:
    batch['gt_boxes'][i, j] = (x1, y1, x2, y2)
    batch['gt_labels'][i, j] = label
    batch['gt_valid'][i, j] = True
    batch['gt_masks'][i, j, y1:y2, x1:x2] = 1
    # Brighten the object so that there is something to detect.
    batch['image'][i, y1:y2, x1:x2] += 2.0
  return batch


def run(kind: str, initial_state):
  config = make_config('jit' if kind == 'single' else kind)
  # One init for all three (init compiles the whole detector: ~20 s); only the
  # BatchNorm axis of the pmap model differs, which init does not depend on.
  state = initial_state.replace(apply_fn=detection_trainer.build_model(config).apply)
  step = detection_trainer.bind_train_step(config)
  losses = []
  if kind == 'single':
    step_fn = jax.jit(step)
    device_state = jax.device_put(state, jax.devices()[0])
    for _ in range(NUM_STEPS):
      device_state, metrics = step_fn(device_state, fixed_batch())
      losses.append(float(metrics['loss']))
    final = jax.device_get(device_state)
  else:
    driver = parallel.make_driver(kind, step, config.dataset.num_classes)
    assert driver.num_devices == 2, driver.num_devices
    device_state = driver.put_state(state)
    for _ in range(NUM_STEPS):
      device_state, metrics = driver.train_step(device_state, fixed_batch())
      losses.append(float(metrics['loss']))
    final = driver.get_state(device_state)
  return losses, checkpoints.state_arrays(final)


def max_difference(a, b) -> float:
  diffs = jax.tree_util.tree_map(
      lambda x, y: float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64)))),
      a, b)
  return max(jax.tree_util.tree_leaves(diffs))


def main():
  initial_state = detection_trainer.create_state(make_config('jit'))
  results = {kind: run(kind, initial_state) for kind in ('single', 'pmap', 'jit')}
  _, single_state = results['single']
  initial = checkpoints.state_arrays(initial_state)
  report = {'losses': {k: v[0] for k, v in results.items()},
            'param_change': max_difference(initial['params'], single_state['params'])}
  for kind in ('pmap', 'jit'):
    _, state = results[kind]
    report[f'{kind}_params_diff'] = max_difference(single_state['params'], state['params'])
    report[f'{kind}_batch_stats_diff'] = max_difference(single_state['batch_stats'],
                                                        state['batch_stats'])
  print(json.dumps(report))


if __name__ == '__main__':
  sys.exit(main())
