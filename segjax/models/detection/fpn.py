"""Feature Pyramid Network on a ResNet (Lin et al., CVPR 2017 §3), torchvision's layout.

`BackboneWithFPN` = torchvision's `BackboneWithFPN`: a ResNet `body` returning
res2..res5 (C2..C5, strides 4..32) and an `fpn` that builds

    P5 = layer_blocks_3(inner_blocks_3(C5))
    Pk = layer_blocks_{k-2}(inner_blocks_{k-2}(Ck) + nearest_upsample(inner of level k+1))
    P6 = P5[:, ::2, ::2]   (LastLevelMaxPool: max pool, kernel 1, stride 2)

with 1x1 lateral convs (`inner_blocks_i`) and 3x3 output convs (`layer_blocks_i`),
all `out_channels` wide (256 in the paper, §3 "we set d = 256"). The top-down
upsampling is nearest neighbour to the lateral's size (PyTorch's `interpolate(size=...,
mode='nearest')`: source index floor(i * in / out)), so odd sizes work as in torchvision.

Parameter paths mirror torchvision's `backbone.body.*` (see `segjax.models.resnet`) and
`backbone.fpn.inner_blocks.{i}.0.*` / `layer_blocks.{i}.0.*` (torchvision >= 0.13 wraps
each conv in a `Conv2dNormActivation`; the `.0` is the conv). Kernels are HWIO.

Frozen BatchNorm (`freeze_bn=True`): the body always runs BatchNorm with its stored
statistics (torchvision's `FrozenBatchNorm2d`, detectron2's default); the trainer also
keeps the BN scale/bias fixed (`segjax.train.detection_trainer`).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from segjax.models import layers

FPN_INPUTS = ('res2', 'res3', 'res4', 'res5')
FPN_OUTPUTS = ('p2', 'p3', 'p4', 'p5', 'p6')

# torchvision's FPN init: kaiming_uniform_(a=1), i.e. U(+-sqrt(3 / fan_in)); bias 0.
fpn_kernel_init = nn.initializers.variance_scaling(1.0, 'fan_in', 'uniform')


def upsample_nearest(x: jax.Array, size: tuple[int, int]) -> jax.Array:
  """[B, h, w, C] -> [B, H, W, C], PyTorch `interpolate(mode='nearest', size=(H, W))`."""
  in_h, in_w = x.shape[1:3]
  out_h, out_w = size
  rows = np.minimum(np.floor(np.arange(out_h) * np.float32(in_h / out_h)), in_h - 1)
  cols = np.minimum(np.floor(np.arange(out_w) * np.float32(in_w / out_w)), in_w - 1)
  return x[:, rows.astype(np.int32)][:, :, cols.astype(np.int32)]


class FeaturePyramidNetwork(nn.Module):
  """FPN top-down pathway + LastLevelMaxPool: {'res2'..'res5'} -> {'p2'..'p6'}."""
  out_channels: int = 256
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, features: dict[str, jax.Array]) -> dict[str, jax.Array]:
    conv = lambda k, name: layers.conv2d(self.out_channels, k, dtype=self.dtype,
                                         kernel_init=fpn_kernel_init, name=name)
    xs = [features[name] for name in FPN_INPUTS]
    last = len(xs) - 1
    inner = conv(1, f'inner_blocks_{last}')(xs[last])
    results = [conv(3, f'layer_blocks_{last}')(inner)]
    for idx in range(last - 1, -1, -1):
      lateral = conv(1, f'inner_blocks_{idx}')(xs[idx])
      inner = lateral + upsample_nearest(inner, lateral.shape[1:3])
      results.insert(0, conv(3, f'layer_blocks_{idx}')(inner))
    results.append(results[-1][:, ::2, ::2])  # LastLevelMaxPool (kernel 1, stride 2)
    return dict(zip(FPN_OUTPUTS, results))


class BackboneWithFPN(nn.Module):
  """`body` (a segjax ResNet) then `fpn`; returns {'p2', ..., 'p6'}, strides 4..64.

  Attributes:
    body: a `segjax.models.resnet.ResNet` at output_stride 32.
    out_channels: FPN width (256).
    freeze_bn: run the body's BatchNorm on stored statistics even when training.
  """
  body: nn.Module
  out_channels: int = 256
  freeze_bn: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> dict[str, jax.Array]:
    features = self.body(x, train=train and not self.freeze_bn)
    return FeaturePyramidNetwork(self.out_channels, dtype=self.dtype, name='fpn')(features)
