"""DeepLab v1, v2, v3 and v3+ semantic segmentation heads on VGG and ResNet backbones.

Papers (cited by section next to every constant below):
  [v1]  Chen et al., "Semantic image segmentation with deep convolutional nets and
        fully connected CRFs", ICLR 2015.
  [v2]  Chen et al., "DeepLab: ... atrous convolution, and fully connected CRFs",
        TPAMI 2017.
  [v3]  Chen et al., "Rethinking atrous convolution for semantic image segmentation",
        arXiv 2017.
  [v3+] Chen et al., "Encoder-decoder with atrous separable convolution for semantic
        image segmentation", ECCV 2018.

Models (registry names in `segjax.models.MODELS`):

  deeplab_v1               VGG fc6 7x7, 4096 channels, rate 4 ("DeepLab-CRF-7x7",
                           [v1] §3.2 and Table 2), fc7 1x1 4096, fc8 1x1 -> classes.
  deeplab_v1_largefov      fc6 3x3, 1024 channels, rate 12; fc7 1024 ([v1] §3.2, Table 2).
  deeplab_v1_msc(_largefov) + multi-scale features: the input and pool1..pool4 each
                           pass through 128 3x3 + 128 1x1 convs, concatenated to fc7
                           before fc8 ([v1] §4.3).
  deeplab_v2_aspp_s/_l     four parallel branches fc6 (3x3, rate r, 1024) -> fc7 (1x1,
                           1024) -> fc8 (1x1, classes), summed; r = (2, 4, 8, 12) for
                           ASPP-S, (6, 12, 18, 24) for ASPP-L ([v2] §3.2, §4.1, Fig. 7).
  deeplab_v2_largefov      one such branch at rate 12: the LargeFOV baseline that [v2]
                           Table 3 compares ASPP against, on any backbone (ResNet too).
  deeplab_v2_7x7           one branch with [v1]'s "DeepLab-CRF-7x7" fc6 (7x7, 4096
                           channels, rate 4; fc7 4096): the head LargeFOV replaced
                           ([v1] Table 2), on any backbone.
  deeplab_v3               torchvision's DeepLabHead: ASPP (1x1, three 3x3 at rates
                           (6, 12, 18) at output stride 16, doubled at 8, image pooling;
                           256 channels with BN, [v3] §3.3) -> 3x3 256 conv/BN/ReLU -> 1x1.
  deeplab_v3plus           the v3 ASPP, then the decoder: low-level stride-4 features
                           reduced to 48 channels by a 1x1 conv, concatenated with the
                           upsampled encoder output, two 3x3 256 convs, 1x1 to classes
                           ([v3+] §3.1, §4.1 Tables 1-2).

Backbone features used (VGG / ResNet): top 'fc7' (v1, the backbone's own fc6/fc7 set
to the variant above) or 'pool5' / 'res5' (v2, v3, v3+; VGG built without fc6/fc7);
low level 'pool2' / 'res2' (v3+); the auxiliary FCNHead reads 'pool4' / 'res4'. The
backbone runs at `output_stride` 8 (v1, v2: [v1] §3.1, [v2] §3.1) or 8/16 (v3, v3+).

Outputs (float32 whatever the compute dtype):
  'coarse_logits' [B, ceil(H/s), ceil(W/s), C] at the logits stride s (the output
                  stride; 4 for v3+);
  'logits'        [B, H, W, C]: 'coarse_logits' upsampled x s bilinearly on the
                  half-pixel grid and cropped to H x W ([v1] §3.1: "bilinear
                  interpolation to upsample by a factor of 8"), as FCN does; v3
                  resizes straight to H x W as torchvision (equal when s divides H, W);
  'aux_logits'    [B, H, W, C] if aux_loss (torchvision's FCNHead);
  with `input_scales` (multi-scale inputs, [v2] §4.1 "MSC"): the network runs on the
  input resized by each scale (shared weights); each scale's coarse logits are resized
  to the coarse grid of scale 1.0 (which must come first) and fused by a per-position
  max ([v2] §4.1), giving 'coarse_logits' and 'logits'; 'scale_coarse_logits' and
  'scale_logits' hold the per-scale maps (on the same grids) for the per-scale losses.

`freeze_bn` runs every BatchNorm in inference mode during training: the running
statistics are used and never updated. (The train step also zeroes the gradients of
the BatchNorm scale/bias, so frozen BN means statistics *and* affine parameters fixed,
as in the released DeepLab v2 ResNet-101 models; see `steps.train_step`.) Dropout is
unaffected except in the auxiliary FCNHead, whose dropout and BN share a flag.

v3 parameter names mirror torchvision's `deeplabv3_resnet50/101` (see
`torchvision_name`): `classifier_0/convs_{0..4}`, `classifier_0/project`,
`classifier_{1,2,4}`, `aux_classifier/{conv,bn,classifier}`, `backbone/...`.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from segjax.models import layers, resnet
from segjax.models.fcn import FCNHead
from segjax.models.resnet import scale_width


@dataclasses.dataclass(frozen=True)
class FC6:
  """DeepLab v1's fc6: kernel size, channels (fc7 too) and atrous rate at stride 8."""
  kernel_size: int
  width: int
  rate: int


# [v1] §3.2 and Table 2: "DeepLab-CRF-7x7" keeps VGG's 7x7 x 4096 fc6 at input stride
# (rate) 4; "DeepLab-CRF-LargeFOV" subsamples fc6 to 3x3 at rate 12 and uses 1024
# channels in fc6 and fc7 (same 224-pixel field of view, 20.5M instead of 134.3M params).
V1_FC6 = {
    'deeplab_v1': FC6(kernel_size=7, width=4096, rate=4),
    'deeplab_v1_largefov': FC6(kernel_size=3, width=1024, rate=12),
    'deeplab_v1_msc': FC6(kernel_size=7, width=4096, rate=4),
    'deeplab_v1_msc_largefov': FC6(kernel_size=3, width=1024, rate=12),
}
MSC_WIDTH = 128  # [v1] §4.3: 128 3x3 filters, then 128 1x1 filters per branch.

# [v2] §3.2 / §4.1 (Fig. 7): ASPP-S r = {2, 4, 8, 12}, ASPP-L r = {6, 12, 18, 24}; each
# branch is fc6 (3x3, rate r) -> fc7 (1x1) -> fc8 with 1024-channel fc6/fc7 as LargeFOV.
ASPP_S_RATES = (2, 4, 8, 12)
ASPP_L_RATES = (6, 12, 18, 24)
V2_LARGEFOV_RATES = (12,)  # [v2] Table 3: LargeFOV = a single branch at r = 12
V2_BRANCH_WIDTH = 1024
V2_7X7 = V1_FC6['deeplab_v1']  # deeplab_v2_7x7: [v1]'s 7x7 x 4096 fc6 at rate 4, one branch

# [v3] §3.3: rates (6, 12, 18) at output stride 16 "(all with 256 filters and batch
# normalization)"; "the rates are doubled when output stride = 8".
V3_RATES_OS16 = (6, 12, 18)
ASPP_CHANNELS = 256
ASPP_DROPOUT = 0.5  # torchvision ASPP.project's Dropout(0.5)

# [v3+] §4.1: Table 1 picks 48 channels for the 1x1 low-level reduction, Table 2 two
# [3x3, 256] convolutions after the concatenation.
V3PLUS_LOW_LEVEL_CHANNELS = 48
V3PLUS_DECODER_CHANNELS = 256
V3PLUS_DECODER_CONVS = 2

# [v2] §4.1 "MSC": scales {0.5, 0.75, 1}, max-fused; 1.0 first (the reference grid).
V2_INPUT_SCALES = (1.0, 0.75, 0.5)


@dataclasses.dataclass(frozen=True)
class FeatureNames:
  """Backbone feature keys a DeepLab head reads."""
  top: str
  aux: str
  low_level: str
  msc: tuple[str, ...] = ()


FEATURE_NAMES = {
    'vgg': FeatureNames(top='pool5', aux='pool4', low_level='pool2',
                        msc=('pool1', 'pool2', 'pool3', 'pool4')),
    'resnet': FeatureNames(top='res5', aux='res4', low_level='res2'),
}


def default_rates(name: str, output_stride: int) -> tuple[int, ...]:
  """The paper's atrous rates of model `name` (fc6 rate for v1, ASPP rates otherwise)."""
  if name in V1_FC6:
    return (V1_FC6[name].rate,)
  if name == 'deeplab_v2_aspp_s':
    return ASPP_S_RATES
  if name == 'deeplab_v2_aspp_l':
    return ASPP_L_RATES
  if name == 'deeplab_v2_largefov':
    return V2_LARGEFOV_RATES
  if name == 'deeplab_v2_7x7':
    return (V2_7X7.rate,)
  if name in ('deeplab_v3', 'deeplab_v3plus'):
    return tuple(r * 16 // output_stride for r in V3_RATES_OS16)
  raise ValueError(f'{name!r} is not a DeepLab model')


def num_rates(name: str) -> int:
  """How many atrous rates model `name` takes."""
  return len(default_rates(name, 16))


def _upsample(y: jax.Array, factor: int, height: int, width: int) -> jax.Array:
  """x factor bilinear upsampling on the half-pixel grid, cropped to height x width."""
  if factor > 1:
    y = layers.bilinear_resize(y, (y.shape[1] * factor, y.shape[2] * factor),
                               align_corners=False)
  return y[:, :height, :width]


# ---------------------------------------------------------------------------
# Head building blocks.


class FCBranch(nn.Module):
  """fc6 (k x k, rate) -> ReLU -> dropout -> fc7 (1x1) -> ReLU -> dropout -> fc8 (1x1).

  One DeepLab v2 ASPP branch ([v2] Fig. 7); fc6/fc7 as VGG's (normal(0.01) init).
  """
  num_classes: int
  width: int
  rate: int
  kernel_size: int = 3
  dropout_rate: float = 0.5
  fc_init: str = 'normal'
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    init = layers.FC_INITS[self.fc_init]
    drop = lambda y: nn.Dropout(self.dropout_rate, deterministic=not train)(nn.relu(y))
    x = drop(layers.conv2d(self.width, self.kernel_size, dilation=self.rate,
                           dtype=self.dtype, kernel_init=init, name='fc6')(x))
    x = drop(layers.conv2d(self.width, 1, dtype=self.dtype, kernel_init=init, name='fc7')(x))
    return layers.conv2d(self.num_classes, 1, dtype=self.dtype,
                         kernel_init=nn.initializers.normal(0.01),
                         name='fc8')(x)


class ASPPPooling(nn.Module):
  """Image-level features ([v3] §3.3): global average pool -> 1x1 conv/BN/ReLU -> broadcast.

  torchvision's ASPPPooling; `conv`, `bn` map to its indices 1 and 2.
  """
  features: int
  bn_axis_name: str | None = None
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    pooled = jnp.mean(x, axis=(1, 2), keepdims=True)
    y = layers.conv2d(self.features, 1, use_bias=False, dtype=self.dtype, name='conv')(pooled)
    y = layers.batch_norm(train, axis_name=self.bn_axis_name, dtype=self.dtype, name='bn')(y)
    # torchvision resizes the 1x1 map bilinearly: a broadcast.
    return jnp.broadcast_to(nn.relu(y), x.shape[:3] + (self.features,))


class ASPP(nn.Module):
  """DeepLab v3 ASPP as torchvision's `ASPP` ([v3] §3.3).

  convs_0: 1x1; convs_1..3: 3x3 at `rates`; convs_4: image pooling; each to `features`
  channels with BN + ReLU; concatenated, projected by a 1x1 conv/BN/ReLU (`project`),
  then dropout.
  """
  rates: tuple[int, ...]
  features: int = ASPP_CHANNELS
  dropout_rate: float = ASPP_DROPOUT
  bn_axis_name: str | None = None
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool, bn_train: bool) -> jax.Array:
    cbr = lambda k, d, name: layers.ConvBN(self.features, k, dilation=d,
                                           bn_axis_name=self.bn_axis_name, dtype=self.dtype,
                                           name=name)
    branches = [cbr(1, 1, 'convs_0')(x, train=bn_train)]
    for i, rate in enumerate(self.rates, start=1):
      branches.append(cbr(3, rate, f'convs_{i}')(x, train=bn_train))
    branches.append(ASPPPooling(self.features, self.bn_axis_name, self.dtype,
                                name=f'convs_{len(self.rates) + 1}')(x, train=bn_train))
    y = cbr(1, 1, 'project')(jnp.concatenate(branches, axis=-1), train=bn_train)
    return nn.Dropout(self.dropout_rate, deterministic=not train)(y)


# ---------------------------------------------------------------------------
# The models.

HeadFn = Callable[..., jax.Array]


class DeepLab(nn.Module):
  """Shared by every DeepLab: backbone, multi-scale inputs, upsampling, aux head, BN freeze.

  Subclasses implement `make_head(train=, bn_train=)`, which creates the head's
  submodules (inside the compact `__call__`, so the calls for several input scales
  share weights) and returns `head(image, features) -> coarse logits`, and
  `logits_stride()`.

  Attributes:
    backbone: VGG or ResNet module (see `FEATURE_NAMES`), at the model's output stride.
    num_classes: output channels.
    atrous_rates: the head's rates (already resolved, see `default_rates`).
    feature_names: which backbone maps the head reads.
    input_scales: () or scales starting with 1.0 ([v2] §4.1 MSC).
    freeze_bn: BatchNorm statistics (and, via the train step, affine params) frozen.
    aux_loss: add torchvision's FCNHead on `feature_names.aux` ('aux_logits').
    width_multiplier: scales the head's channel counts like the backbone's.
    dropout_rate: dropout of the head (fc6/fc7 for v1/v2, ASPP projection for v3/v3+).
    fc_init: v2 ASPP branches' fc6/fc7 initialiser (`layers.FC_INITS`; v1's are the
      backbone's).
  """
  backbone: nn.Module
  num_classes: int
  atrous_rates: tuple[int, ...]
  feature_names: FeatureNames
  input_scales: tuple[float, ...] = ()
  freeze_bn: bool = False
  aux_loss: bool = False
  width_multiplier: float = 1.0
  dropout_rate: float = 0.5
  fc_init: str = 'normal'
  bn_axis_name: str | None = None
  dtype: Any = jnp.float32

  def logits_stride(self) -> int:
    return self.backbone.feature_strides()[self.feature_names.top]

  def make_head(self, *, train: bool, bn_train: bool) -> HeadFn:
    raise NotImplementedError

  def width(self, channels: int) -> int:
    return scale_width(channels, self.width_multiplier)

  def to_input_size(self, y: jax.Array, stride: int, height: int, width: int) -> jax.Array:
    """Stride-`stride` logits -> [B, height, width, C]: x stride bilinear, then cropped."""
    return _upsample(y, stride, height, width)

  def check(self) -> None:
    if self.input_scales and float(self.input_scales[0]) != 1.0:
      raise ValueError(f'input_scales={self.input_scales} must start with 1.0')

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> dict[str, jax.Array]:
    self.check()
    bn_train = train and not self.freeze_bn
    head = self.make_head(train=train, bn_train=bn_train)
    height, width = x.shape[1], x.shape[2]
    stride = self.logits_stride()

    def single_scale(image):
      feats = self.backbone(image, train=bn_train)
      coarse = head(image, feats)
      return coarse.astype(jnp.float32), feats

    coarse, feats = single_scale(x)
    out = {}
    if len(self.input_scales) > 1:
      per_scale = [coarse]
      for s in self.input_scales[1:]:
        size = (max(1, round(height * s)), max(1, round(width * s)))
        scaled, _ = single_scale(layers.bilinear_resize(x, size, align_corners=False))
        per_scale.append(layers.bilinear_resize(scaled, coarse.shape[1:3],
                                                align_corners=False))
      coarse = jnp.max(jnp.stack(per_scale), axis=0)
      out['scale_coarse_logits'] = tuple(per_scale)
      out['scale_logits'] = tuple(self.to_input_size(c, stride, height, width)
                                  for c in per_scale)
    out['coarse_logits'] = coarse
    out['logits'] = self.to_input_size(coarse, stride, height, width)

    if self.aux_loss:
      aux = FCNHead(self.num_classes, bn_axis_name=self.bn_axis_name, dtype=self.dtype,
                    name='aux_classifier')(feats[self.feature_names.aux], train=bn_train)
      aux_stride = self.backbone.feature_strides()[self.feature_names.aux]
      out['aux_logits'] = self.to_input_size(aux.astype(jnp.float32), aux_stride, height, width)
    return out


class DeepLabV1(DeepLab):
  """DeepLab v1 ([v1] §3): fc8 on the backbone's fc7, optionally with MSc features.

  The backbone must be a VGG at output stride 8 whose fc6/fc7 follow `V1_FC6` (built
  so by `segjax.models.build_model`); this module adds fc8 and the MSc branches.
  MSc ([v1] §4.3): each branch is 3x3 conv (128) -> ReLU -> 1x1 conv (128) -> ReLU; its
  3x3 conv is strided so every branch lands on the stride-8 grid (the input by 8,
  pool1 by 4, pool2 by 2). The paper only gives the channel counts and trains the
  branches on a fixed DeepLab; here everything trains jointly.
  """
  msc: bool = False

  def logits_stride(self) -> int:
    return self.backbone.feature_strides()['fc7']

  def check(self) -> None:
    super().check()
    if self.freeze_bn:
      raise ValueError('DeepLab v1 does not support freeze_bn: its VGG fc6/fc7 dropout '
                       'and BatchNorm share the train flag; v1 uses VGG without BN')

  def make_head(self, *, train: bool, bn_train: bool) -> HeadFn:
    del train, bn_train  # fc6/fc7 and their dropout live in the backbone.
    init = nn.initializers.normal(0.01)
    fc8 = layers.conv2d(self.num_classes, 1, dtype=self.dtype, kernel_init=init, name='fc8')
    sources = ('image',) + self.feature_names.msc
    branches = []
    if self.msc:
      strides = {'image': 1, **self.backbone.feature_strides()}
      top_stride = self.logits_stride()
      for i, source in enumerate(sources):
        conv1 = layers.conv2d(self.width(MSC_WIDTH), 3, strides=top_stride // strides[source],
                              dtype=self.dtype, name=f'msc_{i}_conv1')
        conv2 = layers.conv2d(self.width(MSC_WIDTH), 1, dtype=self.dtype,
                              name=f'msc_{i}_conv2')
        branches.append((source, conv1, conv2))

    def head(image, feats):
      maps = {'image': image.astype(self.dtype), **feats}
      y = [feats['fc7']]
      for source, conv1, conv2 in branches:
        y.append(nn.relu(conv2(nn.relu(conv1(maps[source])))))
      return fc8(jnp.concatenate(y, axis=-1))
    return head


class DeepLabV2(DeepLab):
  """DeepLab v2 ASPP ([v2] §3.2): one `FCBranch` per rate on the top features, summed.

  `branch_kernel_size` / `branch_width`: every branch's fc6 kernel and fc6/fc7 channels
  (before width scaling); 3 and 1024 are [v2]'s, 7 and 4096 make `deeplab_v2_7x7`.
  """
  branch_kernel_size: int = 3
  branch_width: int = V2_BRANCH_WIDTH

  def make_head(self, *, train: bool, bn_train: bool) -> HeadFn:
    del bn_train
    branches = [FCBranch(self.num_classes, self.width(self.branch_width), rate,
                         kernel_size=self.branch_kernel_size,
                         dropout_rate=self.dropout_rate, fc_init=self.fc_init, dtype=self.dtype,
                         name=f'aspp_{i}')
                for i, rate in enumerate(self.atrous_rates)]

    def head(image, feats):
      del image
      top = feats[self.feature_names.top]
      return sum(branch(top, train=train) for branch in branches)
    return head


class DeepLabV3(DeepLab):
  """torchvision's DeepLabHead ([v3] §3.3): ASPP -> 3x3 conv/BN/ReLU -> 1x1 conv.

  Logits (and aux logits) are resized straight to the input size, as torchvision's
  `_SimpleSegmentationModel` does (`F.interpolate(size=input_shape, mode='bilinear',
  align_corners=False)`), so imported weights give its numbers at any input size; when
  the stride divides H and W this equals the other DeepLabs' x stride + crop.
  """

  def to_input_size(self, y: jax.Array, stride: int, height: int, width: int) -> jax.Array:
    del stride
    return layers.bilinear_resize(y, (height, width), align_corners=False)

  def make_head(self, *, train: bool, bn_train: bool) -> HeadFn:
    channels = self.width(ASPP_CHANNELS)
    aspp = ASPP(tuple(self.atrous_rates), channels, self.dropout_rate, self.bn_axis_name,
                self.dtype, name='classifier_0')
    conv = layers.conv2d(channels, 3, use_bias=False, dtype=self.dtype, name='classifier_1')
    bn = layers.batch_norm(bn_train, axis_name=self.bn_axis_name, dtype=self.dtype,
                           name='classifier_2')
    classifier = layers.conv2d(self.num_classes, 1, dtype=self.dtype, name='classifier_4')

    def head(image, feats):
      del image
      y = aspp(feats[self.feature_names.top], train=train, bn_train=bn_train)
      return classifier(nn.relu(bn(conv(y))))
    return head


class DeepLabV3Plus(DeepLab):
  """DeepLab v3+ ([v3+] §3.1): the v3 ASPP encoder and a stride-4 decoder.

  The ASPP output (after its projection) is upsampled to the low-level map's stride
  (x4 at output stride 16), concatenated with the low-level features reduced to 48
  channels (1x1 conv/BN/ReLU), refined by two 3x3 256 conv/BN/ReLU and classified by
  a 1x1 conv; the logits stride is 4.
  """

  def logits_stride(self) -> int:
    return self.backbone.feature_strides()[self.feature_names.low_level]

  def make_head(self, *, train: bool, bn_train: bool) -> HeadFn:
    aspp = ASPP(tuple(self.atrous_rates), self.width(ASPP_CHANNELS), self.dropout_rate,
                self.bn_axis_name, self.dtype, name='classifier_0')
    cbr = lambda c, k, name: layers.ConvBN(c, k, bn_axis_name=self.bn_axis_name,
                                           dtype=self.dtype, name=name)
    reduce = cbr(self.width(V3PLUS_LOW_LEVEL_CHANNELS), 1, 'low_level_project')
    decoder = [cbr(self.width(V3PLUS_DECODER_CHANNELS), 3, f'decoder_{i}')
               for i in range(V3PLUS_DECODER_CONVS)]
    classifier = layers.conv2d(self.num_classes, 1, dtype=self.dtype,
                               name='decoder_classifier')
    strides = self.backbone.feature_strides()
    factor = strides[self.feature_names.top] // strides[self.feature_names.low_level]

    def head(image, feats):
      del image
      low = feats[self.feature_names.low_level]
      y = aspp(feats[self.feature_names.top], train=train, bn_train=bn_train)
      y = _upsample(y, factor, low.shape[1], low.shape[2])
      y = jnp.concatenate([y, reduce(low, train=bn_train)], axis=-1)
      for conv in decoder:
        y = conv(y, train=bn_train)
      return classifier(y)
    return head


def torchvision_name(path: str) -> str:
  """Flax path of a DeepLab v3 variable -> torchvision `deeplabv3_resnet*` state_dict key.

  'classifier_0/convs_1/bn/mean' -> 'classifier.0.convs.1.1.running_mean';
  'backbone/layer1_0/conv1/kernel' -> 'backbone.layer1.0.conv1.weight'.
  Also torchvision's `fcn_resnet*` (`segjax.models.fcn_resnet`): 'classifier/bn/scale'
  -> 'classifier.1.weight', 'classifier/classifier/bias' -> 'classifier.4.bias'.
  """
  parts = path.split('/')
  if parts[0] == 'backbone':
    return 'backbone.' + resnet.torchvision_name('/'.join(parts[1:]))
  leaf = {'kernel': 'weight', 'scale': 'weight', 'bias': 'bias',
          'mean': 'running_mean', 'var': 'running_var'}[parts[-1]]
  mods = '/'.join(parts[:-1])
  mods = re.sub(r'convs_4/conv$', 'convs_4/1', mods)  # torchvision: pool, conv, bn, relu
  mods = re.sub(r'convs_4/bn$', 'convs_4/2', mods)
  mods = re.sub(r'/conv$', '/0', mods)
  mods = re.sub(r'/bn$', '/1', mods)
  mods = re.sub(r'^(aux_)?classifier/classifier$', r'\1classifier/4', mods)
  mods = re.sub(r'(classifier|convs)_(\d+)', r'\1/\2', mods)
  return mods.replace('/', '.') + '.' + leaf

