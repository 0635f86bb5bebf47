"""ResNet-18/34/50/101/152 (He et al. 2016) in torchvision's layout, as a backbone.

Stem: conv 7x7/2 (pad 3) -> BN -> ReLU -> max pool 3x3/2 (pad 1); then four stages
of BasicBlocks (18/34) or Bottlenecks (50/101/152, "v1.5": the stride sits on the
3x3 conv). Returned features and their strides (output_stride 32):

  'stem'  after the stem ReLU, before the max pool        stride 2
  'res2'  after layer1 (conv2_x in the paper)             stride 4
  'res3'  after layer2                                    stride 8
  'res4'  after layer3                                    stride 16
  'res5'  after layer4                                    stride 32

Every stride-2 op pads symmetrically (PyTorch), so a stride-s map is ceil(H / s).

`stem_stride` 4 is the above. For small images (CIFAR-style ResNets, He et al. 2016
§4.2, drop the stem's downsampling) 2 drops the max pool and 1 also makes conv1
stride 1; every later stride divides by 4 / stem_stride (stem_stride 1: res2 at 1,
res5 at 8). The weights are the same shapes, so converted checkpoints still load.
`output_stride` keeps naming the dilation pattern of the standard net, so its strides
divide too: stem_stride 2 with output_stride 8 dilates res4 and res5 and ends at 4.

output_stride 16 / 8 is torchvision's `replace_stride_with_dilation`
((False, False, True) / (False, True, True)): the stage's stride becomes 1, its
dilation doubles; the first block of a dilated stage runs its 3x3 conv at the
*previous* dilation (its downsample 1x1 conv gets stride 1), later blocks at the
new one. With the same weights and BatchNorm in eval mode this makes
`res5[OS8][:, ::4, ::4] == res5[OS32]` exactly (tests/test_models_resnet.py).
torchvision refuses dilation in BasicBlock; here both 3x3 convs of a BasicBlock
take the block's dilation (the first the previous one, as above), so ResNet-18/34
also support output_stride 8/16.

Parameter names mirror torchvision (`torchvision_name` converts a path):
`conv1`, `bn1`, `layer{1-4}_{j}/{conv1,bn1,conv2,bn2[,conv3,bn3]}`,
`layer{i}_{j}/downsample_0` (1x1 conv) and `downsample_1` (BN). Conv kernels are
HWIO (torch OIHW -> `transpose(2, 3, 1, 0)`); BN `scale`/`bias` = torch
`weight`/`bias`, batch_stats `mean`/`var` = `running_mean`/`running_var`.
"""

from __future__ import annotations

import re
from functools import partial
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from segjax.models import layers

STAGE_WIDTHS = (64, 128, 256, 512)
STEM_WIDTH = 64
STEM_STRIDES = (1, 2, 4)  # see the module docstring


def scale_width(channels: int, width_multiplier: float) -> int:
  """Channel count scaled by `width_multiplier`, at least 8."""
  return max(8, int(round(channels * width_multiplier)))


def torchvision_name(path: str) -> str:
  """'layer1_0/downsample_1/scale' -> 'layer1.0.downsample.1.weight' (params and batch_stats)."""
  parts = path.split('/')
  leaf = {'kernel': 'weight', 'scale': 'weight', 'bias': 'bias',
          'mean': 'running_mean', 'var': 'running_var'}.get(parts[-1], parts[-1])
  mods = [re.sub(r'^(layer\d|downsample)_(\d+)$', r'\1.\2', p) for p in parts[:-1]]
  return '.'.join(mods + [leaf])


class BasicBlock(nn.Module):
  """Two 3x3 convs (ResNet-18/34). `planes` = output channels."""
  planes: int
  strides: int = 1
  dilation: int = 1  # of the second conv ("new" dilation)
  first_dilation: int = 1  # of the first conv ("previous" dilation)
  downsample: bool = False
  zero_init_residual: bool = False
  bn_axis_name: str | None = None
  dtype: Any = jnp.float32

  expansion = 1

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    bn = partial(layers.batch_norm, train, axis_name=self.bn_axis_name, dtype=self.dtype)
    last_init = nn.initializers.zeros if self.zero_init_residual else nn.initializers.ones
    identity = x
    y = layers.conv2d(self.planes, 3, strides=self.strides, dilation=self.first_dilation,
                      use_bias=False, dtype=self.dtype, name='conv1')(x)
    y = nn.relu(bn(name='bn1')(y))
    y = layers.conv2d(self.planes, 3, dilation=self.dilation, use_bias=False,
                      dtype=self.dtype, name='conv2')(y)
    y = bn(scale_init=last_init, name='bn2')(y)
    if self.downsample:
      identity = layers.conv2d(self.planes, 1, strides=self.strides, use_bias=False,
                               dtype=self.dtype, name='downsample_0')(x)
      identity = bn(name='downsample_1')(identity)
    return layers.computed_once(nn.relu(y + identity))


class Bottleneck(nn.Module):
  """1x1 -> 3x3 (strided, dilated) -> 1x1 x4 (ResNet v1.5, torchvision)."""
  planes: int
  strides: int = 1
  dilation: int = 1  # unused by the 3x3 of the first block of a dilated stage
  first_dilation: int = 1  # dilation of this block's 3x3 conv
  downsample: bool = False
  zero_init_residual: bool = False
  bn_axis_name: str | None = None
  dtype: Any = jnp.float32

  expansion = 4

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    bn = partial(layers.batch_norm, train, axis_name=self.bn_axis_name, dtype=self.dtype)
    last_init = nn.initializers.zeros if self.zero_init_residual else nn.initializers.ones
    out = self.planes * self.expansion
    identity = x
    y = layers.conv2d(self.planes, 1, use_bias=False, dtype=self.dtype, name='conv1')(x)
    y = nn.relu(bn(name='bn1')(y))
    y = layers.conv2d(self.planes, 3, strides=self.strides, dilation=self.first_dilation,
                      use_bias=False, dtype=self.dtype, name='conv2')(y)
    y = nn.relu(bn(name='bn2')(y))
    y = layers.conv2d(out, 1, use_bias=False, dtype=self.dtype, name='conv3')(y)
    y = bn(scale_init=last_init, name='bn3')(y)
    if self.downsample:
      identity = layers.conv2d(out, 1, strides=self.strides, use_bias=False,
                               dtype=self.dtype, name='downsample_0')(x)
      identity = bn(name='downsample_1')(identity)
    return layers.computed_once(nn.relu(y + identity))


class ResNet(nn.Module):
  """ResNet backbone (no classifier) returning {'stem', 'res2', ..., 'res5'}.

  Attributes:
    stage_sizes: blocks per stage, e.g. (3, 4, 6, 3) for ResNet-50.
    block_cls: BasicBlock or Bottleneck.
    width_multiplier: scales every channel count (min 8 for the 3x3 width).
    stage_width_multipliers: () or one multiplier per stage (res2..res5), replacing
      width_multiplier for the stages (the stem keeps width_multiplier). Deep stages run
      on small maps, so widening only them adds capacity at little cost.
    output_stride: 32, 16 or 8 via dilation (see module docstring).
    stem_stride: 4 (conv1 /2, max pool /2), 2 (no max pool) or 1 (neither).
    zero_init_residual: last BN gamma of each block starts at 0 (torchvision option).
    remat: rematerialise every block in the backward pass
      (`layers.recompute_in_backward`): only the blocks' inputs are kept for the
      gradient, their insides are recomputed; less activation memory for about one more
      forward pass, same values.
    bn_axis_name: pmap axis for BatchNorm statistics.
    dtype: compute dtype (params stay float32).
  """
  stage_sizes: tuple[int, ...]
  block_cls: type[nn.Module]
  width_multiplier: float = 1.0
  stage_width_multipliers: tuple[float, ...] = ()
  output_stride: int = 32
  stem_stride: int = 4
  zero_init_residual: bool = False
  remat: bool = False
  bn_axis_name: str | None = None
  dtype: Any = jnp.float32

  def replace_stride_with_dilation(self) -> tuple[bool, bool, bool]:
    if self.output_stride not in (8, 16, 32):
      raise ValueError(f'output_stride must be one of (8, 16, 32), got {self.output_stride}')
    return {32: (False, False, False), 16: (False, False, True),
            8: (False, True, True)}[self.output_stride]

  def check_stem_stride(self) -> None:
    if self.stem_stride not in STEM_STRIDES:
      raise ValueError(f'stem_stride must be one of {STEM_STRIDES}, got {self.stem_stride}')

  def stage_planes(self) -> tuple[int, ...]:
    """Planes (3x3 width) of each stage after the width multipliers."""
    multipliers = tuple(self.stage_width_multipliers) or (self.width_multiplier,) * len(
        STAGE_WIDTHS)
    if len(multipliers) != len(STAGE_WIDTHS) or not all(m > 0 for m in multipliers):
      raise ValueError(f'stage_width_multipliers must be () or {len(STAGE_WIDTHS)} numbers '
                       f'> 0, got {self.stage_width_multipliers!r}')
    return tuple(scale_width(w, m) for w, m in zip(STAGE_WIDTHS, multipliers))

  def feature_strides(self) -> dict[str, int]:
    """Stride of every returned feature map w.r.t. the input."""
    self.check_stem_stride()
    self.replace_stride_with_dilation()  # validates output_stride
    s = self.stem_stride
    top = self.output_stride * s // 4  # output_stride is the stride with the standard stem
    return {'stem': min(2, s), 'res2': s, 'res3': 2 * s, 'res4': min(4 * s, top),
            'res5': min(8 * s, top)}

  def feature_channels(self) -> dict[str, int]:
    e = self.block_cls.expansion
    channels = {'stem': scale_width(STEM_WIDTH, self.width_multiplier)}
    for i, planes in enumerate(self.stage_planes()):
      channels[f'res{i + 2}'] = planes * e
    return channels

  def _recomputed_block(self, block: nn.Module, name: str, x: jax.Array,
                        train: bool) -> jax.Array:
    """Block `name` (its variables are this module's `name` subtree) applied with
    `layers.recompute_in_backward`: the backward keeps only the block's input and
    variables and runs the block again. In training mode its BatchNorm running averages
    are updated as the block itself would update them."""
    params = self.variables['params'][name]
    stats = self.variables['batch_stats'][name]

    def apply(params, stats, x):
      variables = {'params': params, 'batch_stats': stats}
      if not train:
        return block.apply(variables, x, False), stats
      y, updates = block.apply(variables, x, True, mutable=['batch_stats'])
      return y, updates['batch_stats']

    y, new_stats = layers.recompute_in_backward(apply)(params, stats, x)
    if train and self.is_mutable_collection('batch_stats'):
      self.put_variable('batch_stats', name, new_stats)
    return y

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> dict[str, jax.Array]:
    dilate = (False,) + self.replace_stride_with_dilation()
    self.check_stem_stride()
    x = x.astype(self.dtype)
    in_channels = scale_width(STEM_WIDTH, self.width_multiplier)
    x = layers.conv2d(in_channels, 7, strides=min(2, self.stem_stride), use_bias=False,
                      dtype=self.dtype, name='conv1')(x)
    x = layers.batch_norm(train, axis_name=self.bn_axis_name, dtype=self.dtype,
                          name='bn1')(x)
    x = nn.relu(x)
    features = {'stem': x}
    if self.stem_stride == 4:
      x = layers.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))

    # Once the variables exist; also with BatchNorm in inference mode (`freeze_bn`
    # trains the convs so). Not differentiated, a block costs what it did without.
    recompute = self.remat and not self.is_initializing()
    dilation = 1
    for i, (n_blocks, planes) in enumerate(zip(self.stage_sizes, self.stage_planes())):
      strides = 1 if i == 0 else 2
      previous_dilation = dilation
      if dilate[i]:
        dilation *= strides
        strides = 1
      out_channels = planes * self.block_cls.expansion
      for j in range(n_blocks):
        first = j == 0
        block = partial(
            self.block_cls,
            planes=planes,
            strides=strides if first else 1,
            dilation=dilation,
            first_dilation=previous_dilation if first else dilation,
            downsample=first and (strides != 1 or in_channels != out_channels),
            zero_init_residual=self.zero_init_residual,
            bn_axis_name=self.bn_axis_name, dtype=self.dtype)
        name = f'layer{i + 1}_{j}'
        if recompute:
          x = self._recomputed_block(block(parent=None), name, x, train)
        else:
          x = block(name=name)(x, train)
      in_channels = out_channels
      features[f'res{i + 2}'] = x
    return features


ResNet18 = partial(ResNet, stage_sizes=(2, 2, 2, 2), block_cls=BasicBlock)
ResNet34 = partial(ResNet, stage_sizes=(3, 4, 6, 3), block_cls=BasicBlock)
ResNet50 = partial(ResNet, stage_sizes=(3, 4, 6, 3), block_cls=Bottleneck)
ResNet101 = partial(ResNet, stage_sizes=(3, 4, 23, 3), block_cls=Bottleneck)
ResNet152 = partial(ResNet, stage_sizes=(3, 8, 36, 3), block_cls=Bottleneck)
