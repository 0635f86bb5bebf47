"""VGG-16/19 (Simonyan & Zisserman 2015), with or without BatchNorm, as an FCN backbone.

Returns `{'pool1', ..., 'pool5', 'fc7'}`. fc6/fc7 are convolutions ("convolutionalized"
classifier, FCN §3.1): fc6 is a `fc_kernel_size` x `fc_kernel_size` conv to 4096
channels, fc7 a 1x1 conv to 4096, each followed by ReLU and dropout (train only).
The returned 'fc7' is after ReLU + dropout (FCN's `drop7`, the input of `score_fr`).

Padding: every conv pads like PyTorch (3x3, padding 1; fc6 keeps the size) and the
2x2/2 max pools round *up* (ceil mode, as in Caffe's FCN), so pool_k is
ceil(H / 2^k). FCN's padding=100 trick on conv1_1 and its crop offsets are NOT used:
any input size works and the heads crop at offset 0. For even sizes the pools
equal torchvision's (floor mode) exactly.

output_stride (DeepLab v1 §3.1): 16 turns pool5 into a 3x3/1 (pad 1) max pool and
dilates fc6 by 2; 8 also does this to pool4 and dilates conv5_x by 2 and fc6 by 4.
Feature names are unchanged ('pool4', 'pool5' keep their names at stride 1).
`fc_width` / `fc_dilation` set DeepLab v1's fc6/fc7 (LargeFOV: 1024 channels, rate 12,
DeepLab v1 §3.2); `fc_width=0` drops fc6/fc7 (DeepLab v2's ASPP replaces them) and
the returned dict then has no 'fc7'.

Parameter names (flax -> torchvision `vgg16`/`vgg16_bn` state_dict), see
`torchvision_names`: `convB_I/conv` -> `features.N`, `convB_I/bn` -> `features.N+1`
(BN variants), `fc6` -> `classifier.0`, `fc7` -> `classifier.3`. Kernel layouts:
conv OIHW -> HWIO (`transpose(2, 3, 1, 0)`); fc6 [4096, 512*7*7] (C, H, W order)
-> `reshape(4096, 512, 7, 7).transpose(2, 3, 1, 0)`; fc7 [4096, 4096] -> `.T[None, None]`.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from segjax.models import layers

# Convs per block: VGG paper Table 1, configurations D (16) and E (19).
STAGE_SIZES = {16: (2, 2, 3, 3, 3), 19: (2, 2, 4, 4, 4)}
STAGE_WIDTHS = (64, 128, 256, 512, 512)
FC_WIDTH = 4096


def scale_width(channels: int, width_multiplier: float) -> int:
  """Channel count scaled by `width_multiplier`, at least 8."""
  return max(8, int(round(channels * width_multiplier)))


def torchvision_names(depth: int, batch_norm: bool) -> dict[str, str]:
  """Maps flax module paths to torchvision state_dict prefixes for vgg{depth}[_bn]."""
  names = {}
  index = 0
  for block, n in enumerate(STAGE_SIZES[depth], start=1):
    for i in range(1, n + 1):
      names[f'conv{block}_{i}/conv'] = f'features.{index}'
      if batch_norm:
        names[f'conv{block}_{i}/bn'] = f'features.{index + 1}'
        index += 3  # conv, bn, relu
      else:
        index += 2  # conv, relu
    index += 1  # max pool
  names['fc6'] = 'classifier.0'
  names['fc7'] = 'classifier.3'
  return names


class VGG(nn.Module):
  """VGG backbone returning pooled features and the convolutionalized fc7.

  Attributes:
    depth: 16 or 19.
    batch_norm: conv -> BN -> ReLU (torchvision `vgg16_bn`); the conv keeps its bias.
    width_multiplier: scales every channel count, fc6/fc7 included (min 8).
    output_stride: 32, 16 or 8 (see module docstring).
    fc_kernel_size: fc6 kernel size; 7 reproduces VGG's classifier, smaller
      suits tiny inputs.
    dropout_rate: after fc6 and fc7 ReLUs, train only (rng name 'dropout').
    fc_width: fc6/fc7 channels before width scaling; 0 = no fc6/fc7.
    fc_dilation: fc6 rate; None = the output-stride rule (1, 2 or 4).
    fc_init: fc6/fc7 kernel initialiser, a key of `layers.FC_INITS`.
    bn_axis_name: pmap axis for BatchNorm statistics.
    dtype: compute dtype (params stay float32).
  """
  depth: int = 16
  batch_norm: bool = False
  width_multiplier: float = 1.0
  output_stride: int = 32
  fc_kernel_size: int = 7
  dropout_rate: float = 0.5
  fc_width: int = FC_WIDTH
  fc_dilation: int | None = None
  fc_init: str = 'normal'
  bn_axis_name: str | None = None
  dtype: Any = jnp.float32

  def feature_strides(self) -> dict[str, int]:
    """Stride of every returned feature map w.r.t. the input."""
    strides = {f'pool{k}': min(2**k, self.output_stride) for k in range(1, 6)}
    if self.fc_width:
      strides['fc7'] = strides['pool5']
    return strides

  def feature_channels(self) -> dict[str, int]:
    channels = {f'pool{k}': scale_width(c, self.width_multiplier)
                for k, c in enumerate(STAGE_WIDTHS, start=1)}
    if self.fc_width:
      channels['fc7'] = scale_width(self.fc_width, self.width_multiplier)
    return channels

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> dict[str, jax.Array]:
    if self.depth not in STAGE_SIZES:
      raise ValueError(f'VGG depth must be one of {sorted(STAGE_SIZES)}, got {self.depth}')
    if self.output_stride not in (8, 16, 32):
      raise ValueError(f'output_stride must be one of (8, 16, 32), got {self.output_stride}')
    x = x.astype(self.dtype)
    features = {}
    dilation = 1
    stride = 1
    for block, (n, width) in enumerate(zip(STAGE_SIZES[self.depth], STAGE_WIDTHS), 1):
      for i in range(1, n + 1):
        x = layers.ConvBN(
            scale_width(width, self.width_multiplier), 3, dilation=dilation,
            use_bn=self.batch_norm, use_bias=True, bn_axis_name=self.bn_axis_name,
            dtype=self.dtype, name=f'conv{block}_{i}')(x, train=train)
      if stride * 2 <= self.output_stride:
        x = layers.max_pool(x, (2, 2), strides=(2, 2), padding='SAME')
        stride *= 2
      else:
        # DeepLab v1: a 3x3/1 pool keeps the resolution; later convs dilate.
        x = layers.max_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)))
        dilation *= 2
      features[f'pool{block}'] = x
    if not self.fc_width:
      return features

    fc_init = layers.FC_INITS[self.fc_init]  # 'normal': torchvision's nn.Linear init in VGG
    fc_width = scale_width(self.fc_width, self.width_multiplier)
    drop = partial(nn.Dropout, self.dropout_rate, deterministic=not train)
    fc_dilation = dilation if self.fc_dilation is None else self.fc_dilation
    x = layers.conv2d(fc_width, self.fc_kernel_size, dilation=fc_dilation,
                      dtype=self.dtype, kernel_init=fc_init, name='fc6')(x)
    x = drop()(nn.relu(x))
    x = layers.conv2d(fc_width, 1, dtype=self.dtype, kernel_init=fc_init,
                      name='fc7')(x)
    features['fc7'] = drop()(nn.relu(x))
    return features


VGG16 = partial(VGG, depth=16, batch_norm=False)
VGG16BN = partial(VGG, depth=16, batch_norm=True)
VGG19 = partial(VGG, depth=19, batch_norm=False)
VGG19BN = partial(VGG, depth=19, batch_norm=True)
