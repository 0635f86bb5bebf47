"""Checks a whole config before anything is built or compiled.

Every error names the offending field, its value and the valid choices, so a typo
on the command line fails in a second instead of deep inside XLA.
"""

from __future__ import annotations

import numbers

from segjax import models
from segjax.models import crf
from segjax.train import init_from, loop, loss_scale, optimizers, parallel

_POSITIVE_INTS = ('num_train_steps', 'batch_size', 'eval_batch_size', 'eval_every_steps',
                  'checkpoint_every_steps', 'log_every_steps', 'keep_checkpoints')


def validate_config(config) -> None:
  """Validates a semantic-segmentation config, or an instance one (`config.task`)."""
  if config.get('task', 'semantic') != 'semantic':
    from segjax import detection_config  # pylint: disable=import-outside-toplevel
    detection_config.validate_detection_config(config)
    return
  if config.parallel not in parallel.DRIVERS:
    raise ValueError(f'config.parallel={config.parallel!r} is not one of {parallel.DRIVERS}')
  for name in _POSITIVE_INTS:
    value = config[name]
    if not isinstance(value, int) or value <= 0:
      raise ValueError(f'config.{name}={value!r} must be a positive integer')
  if config.keep_best_checkpoints < 0:
    raise ValueError(f'config.keep_best_checkpoints={config.keep_best_checkpoints!r} must be >= 0')
  loop.validate_nonfinite_policy(config.nonfinite)
  loop.validate_conv_weight_grad(config.conv_weight_grad)
  loop.validate_prefetch_to_device(config.get('prefetch_to_device', 0))
  loss_scale.validate_loss_scaling(config.get('loss_scaling', 'auto'))
  models.validate_model_config(config.model)
  optimizers.validate_optimizer_config(config.optimizer)
  if 'init_from' in config:  # configs saved before the field existed have none
    init_from.validate_config(config.init_from)
  _validate_dataset(config.dataset)
  class_weights = config.loss.class_weights
  if class_weights and len(class_weights) != config.dataset.num_classes:
    raise ValueError(f'config.loss.class_weights has {len(class_weights)} entries, '
                     f'expected config.dataset.num_classes={config.dataset.num_classes}')
  _validate_loss_options(config)
  _validate_eval(config)


def _validate_loss_options(config) -> None:
  downsample = config.loss.downsample_labels
  if not isinstance(downsample, bool):
    raise ValueError(f'config.loss.downsample_labels={downsample!r} must be True or False')
  if downsample and models.coarse_logits_stride(config.model) is None:
    raise ValueError(f'config.loss.downsample_labels=True needs a model with coarse logits '
                     f'(one of {sorted(models.DEEPLAB_MODELS)}), not '
                     f'model.name={config.model.name!r}')


def _validate_eval(config) -> None:
  """config.eval: test-time augmentation and the dense CRF."""
  scales = tuple(config.eval.tta.scales)
  if not scales or any(isinstance(s, bool) or not isinstance(s, numbers.Real) or not s > 0
                       for s in scales):
    raise ValueError(f'config.eval.tta.scales={scales!r} must be one or more numbers > 0, '
                     'e.g. (1.0,) or (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)')
  flip = config.eval.tta.flip
  if not isinstance(flip, bool):
    raise ValueError(f'config.eval.tta.flip={flip!r} must be True or False')
  if flip and not config.dataset.hflip:
    raise ValueError('config.eval.tta.flip=True but config.dataset.hflip=False: the model '
                     'never saw mirrored images (a mirrored digit is another symbol); set '
                     'both or neither')
  from segjax import detection_config  # pylint: disable=import-outside-toplevel
  detection_config.validate_num_images(config)
  try:
    crf.validate_crf_config(config.eval.crf)
  except ValueError as error:
    raise ValueError(f'config.eval.{error}') from None


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
