"""Run by test_parallel.py in a subprocess with 8 simulated CPU devices.

Trains the same tiny FCN (ResNet-18 backbone, so BatchNorm statistics must be
synced) for a few steps on the same random batches three ways — one device, pmap
over 8, jit over an 8-device mesh — and prints the losses and final parameters'
max differences as JSON.
"""

import json
import os
import sys

os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=8')

import jax  # pylint: disable=g-import-not-at-top
import numpy as np

from segjax import base_config
from segjax.train import checkpoints, steps, trainer

NUM_STEPS = 4


def make_config(parallel_kind: str):
  config = base_config.get_base_config()
  config.parallel = parallel_kind
  config.model.name = 'fcn8s'
  config.model.backbone = 'resnet18'
  config.model.width_multiplier = 0.125
  config.dataset.crop_size = (32, 32)
  config.batch_size = 16
  config.num_train_steps = NUM_STEPS
  # Large enough that the backbone moves measurably (its gradient is zero at the
  # first step, behind the zero-initialised score layers). SGD rather than Adam:
  # Adam's g / sqrt(v) turns float-rounding noise in near-zero gradients into
  # lr-sized steps, which would compare rounding, not the drivers.
  config.optimizer.learning_rate = 2.0
  return config


def batches(config):
  rng = np.random.default_rng(0)
  for _ in range(NUM_STEPS):
    images = rng.normal(size=(config.batch_size, 32, 32, 3)).astype(np.float32)
    labels = rng.integers(0, config.dataset.num_classes, size=(config.batch_size, 32, 32))
    labels[:, :3] = 255  # unequal labelled-pixel counts per device are fine too
    labels[:5, :, :7] = 255
    yield {'image': images, 'label': labels.astype(np.int32)}


def run(kind: str):
  config = make_config('jit' if kind == 'single' else kind)
  state = trainer.create_state(config)
  losses = []
  if kind == 'single':
    step_fn = jax.jit(steps.bind_train_step(config, axis_name=None))
    device_state = jax.device_put(state, jax.devices()[0])
    for batch in batches(config):
      device_state, metrics = step_fn(device_state, batch)
      losses.append(float(metrics['loss']))
    final = jax.device_get(device_state)
  else:
    driver = trainer.make_driver(config)
    assert driver.num_devices == 8, driver.num_devices
    device_state = driver.put_state(state)
    for batch in batches(config):
      device_state, metrics = driver.train_step(device_state, batch)
      losses.append(float(metrics['loss']))
    final = driver.get_state(device_state)
  return losses, checkpoints.state_arrays(final)


def max_difference(a, b) -> float:
  diffs = jax.tree_util.tree_map(lambda x, y: float(np.max(np.abs(np.asarray(x, np.float64) -
                                                                  np.asarray(y, np.float64)))), a, b)
  return max(jax.tree_util.tree_leaves(diffs))


def main():
  results = {kind: run(kind) for kind in ('single', 'pmap', 'jit')}
  single_losses, single_state = results['single']
  initial = checkpoints.state_arrays(trainer.create_state(make_config('jit')))
  report = {'losses': {k: v[0] for k, v in results.items()},
            'param_change': max_difference(initial['params'], single_state['params']),
            'backbone_change': max_difference(initial['params']['backbone'],
                                              single_state['params']['backbone'])}
  for kind in ('pmap', 'jit'):
    _, state = results[kind]
    report[f'{kind}_params_diff'] = max_difference(single_state['params'], state['params'])
    report[f'{kind}_batch_stats_diff'] = max_difference(single_state['batch_stats'],
                                                        state['batch_stats'])
  json.dump(report, sys.stdout)


if __name__ == '__main__':
  main()
