"""Backbones and segmentation models (FCN, DeepLab); registry name -> constructor.

`build_model(config.model, num_classes=..., bn_axis_name=...)` is what the trainer
calls. The returned module follows the segjax model contract:

  variables = model.init({'params': key}, x, train=False)   # {'params', 'batch_stats'?}
  out, updates = model.apply(variables, x, train=True,
                             rngs={'dropout': key}, mutable=['batch_stats'])
  out['logits']  # [B, H, W, num_classes] float32; 'aux_logits' too if aux_loss
  # DeepLab models also return 'coarse_logits' (see segjax.models.deeplab).

Not every model has 'batch_stats' (vgg16 without aux_loss has none).

Public API (`__all__`): the registries (`MODELS`, `BACKBONES`, ...), config schema and
construction (`default_model_config`, `validate_model_config`, `build_model`,
`build_backbone`), and the modules `layers` (ConvBN, atrous conv, bilinear resize,
bilinear deconv, max-unpool), `vgg`, `resnet`, `fcn`, `fcn_resnet` (torchvision's
fcn_resnet50/101), `deeplab` (ASPP, DeepLab v1-v3+), `crf` (dense CRF) and `detection` (boxes, NMS, RoIAlign, Mask R-CNN). The modules are
plain `flax.linen` modules with `__call__(x, *, train)`; e.g. an ASPP head on your own
backbone's features:

  aspp = deeplab.ASPP(rates=(6, 12, 18), features=256)
  variables = aspp.init(key, features, train=False, bn_train=False)
  y = aspp.apply(variables, features, train=False, bn_train=False)   # [B, h, w, 256]
"""

from __future__ import annotations

__all__ = [
    # modules
    'layers', 'vgg', 'resnet', 'fcn', 'fcn_resnet', 'deeplab', 'crf', 'detection',
    # registries and choices
    'BACKBONES', 'VGG_BACKBONES', 'RESNET_BACKBONES', 'FCN_MODELS', 'DEEPLAB_MODELS',
    'FCN_RESNET_MODELS', 'MODELS', 'UPSAMPLING', 'OUTPUT_STRIDES', 'DTYPES',
    # config schema and construction
    'default_model_config', 'validate_model_config', 'build_model', 'build_backbone',
    'supported_backbones', 'supported_output_strides', 'coarse_logits_stride',
]

import numbers
from functools import partial
from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import ml_collections

from segjax.models import deeplab, fcn, fcn_resnet, layers, resnet, vgg

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
VGG_BACKBONES = tuple(b for b in BACKBONES if b.startswith('vgg'))

FCN_MODELS = {
    'fcn32s': fcn.FCN32s,
    'fcn16s': fcn.FCN16s,
    'fcn8s': fcn.FCN8s,
}
DEEPLAB_MODELS = {
    'deeplab_v1': partial(deeplab.DeepLabV1, msc=False),
    'deeplab_v1_largefov': partial(deeplab.DeepLabV1, msc=False),
    'deeplab_v1_msc': partial(deeplab.DeepLabV1, msc=True),
    'deeplab_v1_msc_largefov': partial(deeplab.DeepLabV1, msc=True),
    'deeplab_v2_aspp_s': deeplab.DeepLabV2,
    'deeplab_v2_aspp_l': deeplab.DeepLabV2,
    'deeplab_v2_largefov': deeplab.DeepLabV2,
    'deeplab_v2_7x7': partial(deeplab.DeepLabV2, branch_kernel_size=deeplab.V2_7X7.kernel_size,
                              branch_width=deeplab.V2_7X7.width),
    'deeplab_v3': deeplab.DeepLabV3,
    'deeplab_v3plus': deeplab.DeepLabV3Plus,
}
# torchvision's fcn_resnet50/101: dilated ResNet + FCNHead (segjax.models.fcn_resnet).
FCN_RESNET_MODELS = {
    'fcn_resnet': fcn_resnet.FCNResNet,
}
MODELS = {**FCN_MODELS, **DEEPLAB_MODELS, **FCN_RESNET_MODELS}
RESNET_BACKBONES = tuple(b for b in BACKBONES if b.startswith('resnet'))

UPSAMPLING = fcn.UPSAMPLING
OUTPUT_STRIDES = (8, 16, 32)
DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16, 'float16': jnp.float16}

# (stride-8 skip, stride-16 skip, top) maps that FCN fuses, per backbone family.
_FCN_FEATURES = {'vgg': ('pool3', 'pool4', 'fc7'), 'resnet': ('res3', 'res4', 'res5')}


def default_model_config(name: str = 'fcn8s') -> ml_collections.ConfigDict:
  """The `model` section of a config for model `name`; its fields are the schema.

  FCN (default): FCN-8s on VGG-16 as in the paper. DeepLab: the paper's backbone
  (VGG-16 for v1, ResNet-101 otherwise) at output stride 8; `atrous_rates=()` means
  the paper's rates (`deeplab.default_rates`), `input_scales=()` single-scale inputs.
  fcn_resnet: torchvision's fcn_resnet50 (ResNet-50 at output stride 8, FCNHead with
  dropout 0.1); `backbone='resnet101'` is fcn_resnet101.
  """
  if name not in MODELS:
    _choice('name', name, MODELS)
  if name in FCN_RESNET_MODELS:
    return ml_collections.ConfigDict({
        'name': name,
        'backbone': 'resnet50',
        'width_multiplier': 1.0,
        'output_stride': 8,
        'aux_loss': False,
        'dtype': 'float32',
        'dropout_rate': fcn_resnet.FCN_HEAD_DROPOUT,
        'freeze_bn': False,
        'remat': False,         # ResNet blocks recomputed in the backward pass (memory)
    })
  if name in FCN_MODELS:
    return ml_collections.ConfigDict({
        'name': name,
        'backbone': 'vgg16',
        'width_multiplier': 1.0,
        'output_stride': 32,
        'upsampling': 'deconv',
        'aux_loss': False,
        'fc_kernel_size': 7,
        'dtype': 'float32',
        'dropout_rate': 0.5,
        'fc_init': 'normal',    # VGG fc6/fc7: 'normal' N(0, 0.01) | 'he' (from scratch)
        # ResNet backbones: 4 = torchvision's stem (conv /2 + max pool /2); 2 drops the
        # max pool, 1 also conv1's stride (small images; every stride divides by 4/s).
        'stem_stride': 4,
        # ResNet only: () or one width multiplier per stage res2..res5, replacing
        # width_multiplier there (the stem keeps it).
        'stage_width_multipliers': (),
        'remat': False,         # ResNet only: blocks recomputed in the backward pass
    })
  return ml_collections.ConfigDict({
      'name': name,
      'backbone': 'vgg16' if name in deeplab.V1_FC6 else 'resnet101',
      'width_multiplier': 1.0,
      'output_stride': 8,
      'aux_loss': False,
      'dtype': 'float32',
      'dropout_rate': 0.5,
      'atrous_rates': (),     # () = the paper's; else one per branch (v1: fc6's rate)
      'input_scales': (),     # () = single scale; else starts with 1.0 (v2 MSC)
      'freeze_bn': False,
      'fc_init': 'normal',      # fc6/fc7 (v1 VGG, v2 ASPP): 'normal' N(0, 0.01) | 'he'
      'stem_stride': 4,         # ResNet only, as FCN's: every stride, the output's too, x s/4
      'stage_width_multipliers': (),  # ResNet only, as FCN's
      'remat': False,           # ResNet only, as FCN's
  })


def _family(backbone: str) -> str:
  return 'vgg' if backbone.startswith('vgg') else 'resnet'


def _choice(field: str, value: Any, choices, context: str = '') -> None:
  if value not in choices:
    raise ValueError(f'model.{field}={value!r} is not valid{context}; '
                     f'choose one of {sorted(choices)}')


def supported_backbones(name: str) -> tuple[str, ...]:
  """Backbones model `name` can use: DeepLab v1 is defined on VGG, fcn_resnet on ResNet,
  the others on any."""
  if name in FCN_RESNET_MODELS:
    return RESNET_BACKBONES
  return VGG_BACKBONES if name in deeplab.V1_FC6 else tuple(BACKBONES)


def supported_output_strides(name: str) -> tuple[int, ...]:
  """FCN: any; DeepLab v1/v2 are defined at 8 ([v1] §3.1, [v2] §3.1); v3/v3+ at 8 or 16."""
  if name in FCN_MODELS:
    return OUTPUT_STRIDES
  if name in ('deeplab_v3', 'deeplab_v3plus') or name in FCN_RESNET_MODELS:
    return (8, 16)
  return (8,)


def coarse_logits_stride(model_config: ml_collections.ConfigDict) -> int | None:
  """Stride of the model's 'coarse_logits' (v3+: its decoder's low-level map), or None if
  it has none (FCN); read from the backbone the config builds (stem_stride included)."""
  c = model_config
  if c.name in FCN_MODELS:
    return None
  names = deeplab.FEATURE_NAMES[_family(c.backbone)]
  key = names.low_level if c.name == 'deeplab_v3plus' else names.top  # [v3+] §3.1
  return build_backbone(c).feature_strides()[key]


def _check_number(field: str, value: Any, ok: bool, requirement: str) -> None:
  if isinstance(value, bool) or not ok:
    raise ValueError(f'model.{field}={value!r} must be {requirement}')


def validate_model_config(model_config: ml_collections.ConfigDict) -> None:
  """Raises ValueError naming the bad field/value and the valid choices."""
  c = model_config
  if 'name' not in c:
    raise ValueError('model config has no field name; see segjax.models.default_model_config()')
  _choice('name', c.name, MODELS)
  known = set(default_model_config(c.name).keys())
  given = set(c.keys())
  if given - known:
    raise ValueError(f'unknown model config field(s) {sorted(given - known)} for '
                     f'model.name={c.name!r}; known fields are {sorted(known)}')
  if known - given:
    raise ValueError(f'model config is missing field(s) {sorted(known - given)}; '
                     f'see segjax.models.default_model_config({c.name!r})')
  _choice('backbone', c.backbone, BACKBONES)
  _choice('backbone', c.backbone, supported_backbones(c.name), f' for {c.name}')
  _choice('output_stride', c.output_stride, OUTPUT_STRIDES)
  _choice('output_stride', c.output_stride, supported_output_strides(c.name), f' for {c.name}')
  _choice('dtype', c.dtype, DTYPES)
  _check_number('width_multiplier', c.width_multiplier,
                isinstance(c.width_multiplier, numbers.Real) and c.width_multiplier > 0,
                'a number > 0')
  _check_number('dropout_rate', c.dropout_rate,
                isinstance(c.dropout_rate, numbers.Real) and 0.0 <= c.dropout_rate < 1.0,
                'in [0, 1)')
  if not isinstance(c.aux_loss, bool):
    raise ValueError(f'model.aux_loss={c.aux_loss!r} must be True or False')
  if not isinstance(c.remat, bool):
    raise ValueError(f'model.remat={c.remat!r} must be True or False')
  if c.remat and _family(c.backbone) != 'resnet':
    raise ValueError(f'model.remat=True needs a ResNet backbone (it rematerialises the '
                     f'residual blocks); use False with {c.backbone}')
  if c.name in FCN_RESNET_MODELS:
    if not isinstance(c.freeze_bn, bool):
      raise ValueError(f'model.freeze_bn={c.freeze_bn!r} must be True or False')
    return
  _choice('fc_init', c.fc_init, layers.FC_INITS)
  _choice('stem_stride', c.stem_stride, resnet.STEM_STRIDES)
  if c.stem_stride != 4 and _family(c.backbone) != 'resnet':
    raise ValueError(f'model.stem_stride={c.stem_stride!r} needs a ResNet backbone; '
                     f'{c.backbone} has no stem to change (use 4)')
  stage = tuple(c.stage_width_multipliers)
  if stage and _family(c.backbone) != 'resnet':
    raise ValueError(f'model.stage_width_multipliers={stage!r} needs a ResNet backbone; '
                     f'use () with {c.backbone}')
  if stage and (len(stage) != len(resnet.STAGE_WIDTHS) or any(
      isinstance(m, bool) or not isinstance(m, numbers.Real) or not m > 0 for m in stage)):
    raise ValueError(f'model.stage_width_multipliers={stage!r} must be () or '
                     f'{len(resnet.STAGE_WIDTHS)} numbers > 0 (res2..res5)')
  if c.name in FCN_MODELS:
    _choice('upsampling', c.upsampling, UPSAMPLING)
    _check_number('fc_kernel_size', c.fc_kernel_size,
                  isinstance(c.fc_kernel_size, numbers.Integral) and c.fc_kernel_size >= 1,
                  'an integer >= 1')
  else:
    _validate_deeplab(c)


def _validate_deeplab(c: ml_collections.ConfigDict) -> None:
  rates, scales = tuple(c.atrous_rates), tuple(c.input_scales)
  n = deeplab.num_rates(c.name)
  if rates and (len(rates) != n or any(isinstance(r, bool) or not isinstance(r, numbers.Integral)
                                       or r < 1 for r in rates)):
    raise ValueError(f'model.atrous_rates={rates!r} must be () (the paper\'s '
                     f'{deeplab.default_rates(c.name, c.output_stride)}) or {n} integers >= 1 '
                     f'for {c.name}')
  if scales and (any(isinstance(s, bool) or not isinstance(s, numbers.Real) or not s > 0
                     for s in scales) or float(scales[0]) != 1.0):
    raise ValueError(f'model.input_scales={scales!r} must be () or positive scales starting '
                     f'with 1.0, e.g. {deeplab.V2_INPUT_SCALES}')
  if not isinstance(c.freeze_bn, bool):
    raise ValueError(f'model.freeze_bn={c.freeze_bn!r} must be True or False')
  if c.freeze_bn and c.name in deeplab.V1_FC6:
    raise ValueError(f'model.freeze_bn=True is not supported by {c.name} (VGG fc6/fc7 '
                     'dropout and BatchNorm share the train flag); use False')


def _rates(c: ml_collections.ConfigDict) -> tuple[int, ...]:
  return tuple(int(r) for r in c.atrous_rates) or deeplab.default_rates(
      c.name, int(c.output_stride))


def _vgg_fc(c: ml_collections.ConfigDict) -> dict[str, Any]:
  """VGG's fc6/fc7: FCN's fc_kernel_size; DeepLab v1's variant; none for v2/v3 (ASPP)."""
  if c.name in FCN_MODELS:
    return dict(fc_kernel_size=int(c.fc_kernel_size))
  if c.name in deeplab.V1_FC6:
    fc6 = deeplab.V1_FC6[c.name]
    return dict(fc_kernel_size=fc6.kernel_size, fc_width=fc6.width, fc_dilation=_rates(c)[0])
  return dict(fc_width=0)


def build_backbone(model_config: ml_collections.ConfigDict, *,
                   bn_axis_name: str | None = None) -> nn.Module:
  """The backbone module named by model_config.backbone (config already validated)."""
  c = model_config
  kwargs = dict(width_multiplier=float(c.width_multiplier),
                output_stride=int(c.output_stride), bn_axis_name=bn_axis_name,
                dtype=DTYPES[c.dtype])
  if _family(c.backbone) == 'vgg':  # fcn_resnet has no VGG backbone (validated)
    kwargs.update(dropout_rate=float(c.dropout_rate), fc_init=c.fc_init, **_vgg_fc(c))
  else:
    kwargs.update(remat=bool(c.remat))
    if 'stem_stride' in c:
      kwargs.update(stem_stride=int(c.stem_stride), stage_width_multipliers=tuple(
          float(m) for m in c.stage_width_multipliers))
  return BACKBONES[c.backbone](**kwargs)


def build_model(model_config: ml_collections.ConfigDict, *, num_classes: int,
                bn_axis_name: str | None = None) -> nn.Module:
  """Validates `model_config` and returns the segmentation module it names.

  Args:
    model_config: see `default_model_config(name)` for the fields.
    num_classes: output channels of 'logits'.
    bn_axis_name: pmap axis name for cross-device BatchNorm, or None (jit/single device).
  """
  validate_model_config(model_config)
  if isinstance(num_classes, bool) or not isinstance(num_classes, numbers.Integral) or num_classes < 1:
    raise ValueError(f'num_classes={num_classes!r} must be a positive integer')
  c = model_config
  backbone = build_backbone(c, bn_axis_name=bn_axis_name)
  if c.name in FCN_MODELS:
    return FCN_MODELS[c.name](
        backbone=backbone,
        num_classes=int(num_classes),
        feature_names=_FCN_FEATURES[_family(c.backbone)],
        upsampling=c.upsampling,
        aux_loss=bool(c.aux_loss),
        bn_axis_name=bn_axis_name,
        dtype=DTYPES[c.dtype])
  if c.name in FCN_RESNET_MODELS:
    return FCN_RESNET_MODELS[c.name](
        backbone=backbone,
        num_classes=int(num_classes),
        atrous_rates=(),
        feature_names=deeplab.FEATURE_NAMES['resnet'],
        freeze_bn=bool(c.freeze_bn),
        aux_loss=bool(c.aux_loss),
        width_multiplier=float(c.width_multiplier),
        dropout_rate=float(c.dropout_rate),
        bn_axis_name=bn_axis_name,
        dtype=DTYPES[c.dtype])
  return DEEPLAB_MODELS[c.name](
      backbone=backbone,
      num_classes=int(num_classes),
      atrous_rates=_rates(c),
      feature_names=deeplab.FEATURE_NAMES[_family(c.backbone)],
      input_scales=tuple(float(s) for s in c.input_scales),
      freeze_bn=bool(c.freeze_bn),
      aux_loss=bool(c.aux_loss),
      width_multiplier=float(c.width_multiplier),
      dropout_rate=float(c.dropout_rate),
      fc_init=c.fc_init,
      bn_axis_name=bn_axis_name,
      dtype=DTYPES[c.dtype])
