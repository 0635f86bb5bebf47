"""Backbones and segmentation models; registry name -> constructor.

`build_model(config.model, num_classes=..., bn_axis_name=...)` is what the trainer
calls. The returned module follows the segjax model contract:

  variables = model.init({'params': key}, x, train=False)   # {'params', 'batch_stats'?}
  out, updates = model.apply(variables, x, train=True,
                             rngs={'dropout': key}, mutable=['batch_stats'])
  out['logits']  # [B, H, W, num_classes] float32; 'aux_logits' too if aux_loss

Not every model has 'batch_stats' (vgg16 without aux_loss has none).
"""

from __future__ import annotations

import numbers
from typing import Any

import jax.numpy as jnp
import ml_collections

from segjax.models import fcn, resnet, vgg

BACKBONES = {
    'vgg16': vgg.VGG16,
    'vgg16_bn': vgg.VGG16BN,
    'vgg19': vgg.VGG19,
    'vgg19_bn': vgg.VGG19BN,
    'resnet18': resnet.ResNet18,
    'resnet34': resnet.ResNet34,
    'resnet50': resnet.ResNet50,
    'resnet101': resnet.ResNet101,
    'resnet152': resnet.ResNet152,
}

MODELS = {
    'fcn32s': fcn.FCN32s,
    'fcn16s': fcn.FCN16s,
    'fcn8s': fcn.FCN8s,
}

UPSAMPLING = fcn.UPSAMPLING
OUTPUT_STRIDES = (8, 16, 32)
DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}

# (stride-8 skip, stride-16 skip, top) maps that FCN fuses, per backbone family.
_FCN_FEATURES = {'vgg': ('pool3', 'pool4', 'fc7'), 'resnet': ('res3', 'res4', 'res5')}


def default_model_config() -> ml_collections.ConfigDict:
  """The `model` section of a config: FCN-8s on VGG-16 as in the paper."""
  return ml_collections.ConfigDict({
      'name': 'fcn8s',
      'backbone': 'vgg16',
      'width_multiplier': 1.0,
      'output_stride': 32,
      'upsampling': 'deconv',
      'aux_loss': False,
      'fc_kernel_size': 7,
      'dtype': 'float32',
      'dropout_rate': 0.5,
  })


def _family(backbone: str) -> str:
  return 'vgg' if backbone.startswith('vgg') else 'resnet'


def _choice(field: str, value: Any, choices) -> None:
  if value not in choices:
    raise ValueError(f'model.{field}={value!r} is not valid; choose one of {sorted(choices)}')


def validate_model_config(model_config: ml_collections.ConfigDict) -> None:
  """Raises ValueError naming the bad field/value and the valid choices."""
  known = set(default_model_config().keys())
  given = set(model_config.keys())
  if given - known:
    raise ValueError(f'unknown model config field(s) {sorted(given - known)}; '
                     f'known fields are {sorted(known)}')
  if known - given:
    raise ValueError(f'model config is missing field(s) {sorted(known - given)}; '
                     f'see segjax.models.default_model_config()')
  c = model_config
  _choice('name', c.name, MODELS)
  _choice('backbone', c.backbone, BACKBONES)
  _choice('upsampling', c.upsampling, UPSAMPLING)
  _choice('output_stride', c.output_stride, OUTPUT_STRIDES)
  _choice('dtype', c.dtype, DTYPES)
  if isinstance(c.width_multiplier, bool) or not isinstance(c.width_multiplier, numbers.Real) \
      or not c.width_multiplier > 0:
    raise ValueError(f'model.width_multiplier={c.width_multiplier!r} must be a number > 0')
  if isinstance(c.fc_kernel_size, bool) or not isinstance(c.fc_kernel_size, numbers.Integral) \
      or c.fc_kernel_size < 1:
    raise ValueError(f'model.fc_kernel_size={c.fc_kernel_size!r} must be an integer >= 1')
  if isinstance(c.dropout_rate, bool) or not isinstance(c.dropout_rate, numbers.Real) \
      or not 0.0 <= c.dropout_rate < 1.0:
    raise ValueError(f'model.dropout_rate={c.dropout_rate!r} must be in [0, 1)')
  if not isinstance(c.aux_loss, bool):
    raise ValueError(f'model.aux_loss={c.aux_loss!r} must be True or False')


def build_backbone(model_config: ml_collections.ConfigDict, *,
                   bn_axis_name: str | None = None):
  """The backbone module named by model_config.backbone (config already validated)."""
  c = model_config
  kwargs = dict(width_multiplier=float(c.width_multiplier),
                output_stride=int(c.output_stride), bn_axis_name=bn_axis_name,
                dtype=DTYPES[c.dtype])
  if _family(c.backbone) == 'vgg':
    kwargs.update(fc_kernel_size=int(c.fc_kernel_size),
                  dropout_rate=float(c.dropout_rate))
  return BACKBONES[c.backbone](**kwargs)


def build_model(model_config: ml_collections.ConfigDict, *, num_classes: int,
                bn_axis_name: str | None = None):
  """Validates `model_config` and returns the segmentation module it names.

  Args:
    model_config: see `default_model_config()` for the fields.
    num_classes: output channels of 'logits'.
    bn_axis_name: pmap axis name for cross-device BatchNorm, or None (jit/single device).
  """
  validate_model_config(model_config)
  if isinstance(num_classes, bool) or not isinstance(num_classes, numbers.Integral) or num_classes < 1:
    raise ValueError(f'num_classes={num_classes!r} must be a positive integer')
  c = model_config
  return MODELS[c.name](
      backbone=build_backbone(c, bn_axis_name=bn_axis_name),
      num_classes=int(num_classes),
      feature_names=_FCN_FEATURES[_family(c.backbone)],
      upsampling=c.upsampling,
      aux_loss=bool(c.aux_loss),
      bn_axis_name=bn_axis_name,
      dtype=DTYPES[c.dtype])
