"""Checks a whole config before anything is built or compiled.

Every error names the offending field, its value and the valid choices, so a typo
on the command line fails in a second instead of deep inside XLA.
"""

from __future__ import annotations

from segjax import models
from segjax.train import optimizers, parallel

_POSITIVE_INTS = ('num_train_steps', 'batch_size', 'eval_batch_size', 'eval_every_steps',
                  'checkpoint_every_steps', 'log_every_steps', 'keep_checkpoints')


def validate_config(config) -> None:
  if config.parallel not in parallel.DRIVERS:
    raise ValueError(f'config.parallel={config.parallel!r} is not one of {parallel.DRIVERS}')
  for name in _POSITIVE_INTS:
    value = config[name]
    if not isinstance(value, int) or value <= 0:
      raise ValueError(f'config.{name}={value!r} must be a positive integer')
  if config.keep_best_checkpoints < 0:
    raise ValueError(f'config.keep_best_checkpoints={config.keep_best_checkpoints!r} must be >= 0')
  models.validate_model_config(config.model)
  optimizers.validate_optimizer_config(config.optimizer)
  _validate_dataset(config.dataset)
  class_weights = config.loss.class_weights
  if class_weights and len(class_weights) != config.dataset.num_classes:
    raise ValueError(f'config.loss.class_weights has {len(class_weights)} entries, '
                     f'expected config.dataset.num_classes={config.dataset.num_classes}')


def _validate_dataset(dataset) -> None:
  from segjax.data import sources  # pylint: disable=g-import-not-at-top
  sources.validate_dataset_name(dataset.name)
  if dataset.num_classes < 2:
    raise ValueError(f'config.dataset.num_classes={dataset.num_classes!r} must be >= 2')
  for field in ('crop_size', 'eval_pad_size'):
    size = tuple(dataset[field])
    if len(size) != 2 or any(not isinstance(s, int) or s <= 0 for s in size):
      raise ValueError(f'config.dataset.{field}={size!r} must be two positive ints (H, W)')
  low, high = dataset.scale_range
  if not 0 < low <= high:
    raise ValueError(f'config.dataset.scale_range={tuple(dataset.scale_range)!r} must satisfy '
                     '0 < low <= high')


def validate_batch_split(config, num_devices: int) -> None:
  """The global batches must split evenly over the devices."""
  for name in ('batch_size', 'eval_batch_size'):
    if config[name] % num_devices:
      raise ValueError(f'config.{name}={config[name]} is not divisible by the {num_devices} '
                       f'devices; use a multiple of {num_devices}')


def class_names(config) -> list[str] | None:
  from segjax.data import sources  # pylint: disable=g-import-not-at-top
  names = sources.class_names(config.dataset.name)
  if names is not None and len(names) != config.dataset.num_classes:
    return None
  return names
