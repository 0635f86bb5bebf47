"""FCN-32s / FCN-16s / FCN-8s (Long, Shelhamer & Darrell, CVPR 2015) on any backbone.

The backbone returns a dict; `feature_names` picks (stride-8 skip, stride-16 skip,
top) maps: ('pool3', 'pool4', 'fc7') for VGG, ('res3', 'res4', 'res5') for ResNet.

  score_fr     1x1 conv on the top map        -> num_classes       (all variants)
  score_pool4  1x1 conv on the stride-16 skip (FCN-16s, FCN-8s)
  score_pool3  1x1 conv on the stride-8 skip  (FCN-8s)

Fusion (FCN §4.2, Fig. 3): upsample the coarser score map to the skip's stride
(`upscore2`, then `upscore_pool4`), crop it to the skip's size at offset 0, add;
finally upsample to the input stride (`upscore`, `upscore16`, `upscore8`) and crop
to the input's H x W. Feature maps are ceil(H / stride), so an f-times upsampled
map always covers the finer one and any input size works. Without FCN's
padding=100 trick the grids are aligned, so the crop offsets are 0 (the Caffe nets'
offsets 5/9/19/31 compensate for that padding). When a skip has the same stride as
the coarser map (dilated backbones, output_stride 16/8) the upsampling is the
identity.

All score layers start at zero: FCN §4.1 ("we initialize the class scoring
convolution layer to zero") and §4.2 for the skips, as in the reference nets.

`upsampling`: 'bilinear' (fixed `bilinear_resize`, align_corners=False),
'deconv' (learnable transposed conv, bilinear init, FCN §3.3) or 'deconv_frozen'
(the same filter, not a parameter, as in FCN's released nets). On the interior the
three agree exactly at init (see layers.BilinearDeconv).

`aux_loss` adds torchvision's FCNHead (3x3 conv to C/4, BN, ReLU, dropout 0.1,
1x1 conv) on the stride-16 skip (res4 / pool4), returned as 'aux_logits' at input
resolution. Outputs are float32 whatever the compute dtype.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from segjax.models import layers

UPSAMPLING = ('bilinear', 'deconv', 'deconv_frozen')


class FCNHead(nn.Module):
  """torchvision's FCNHead; children map to `aux_classifier.{0,1,4}` as conv/bn/classifier."""
  num_classes: int
  dropout_rate: float = 0.1
  bn_axis_name: str | None = None
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool, bn_train: bool | None = None) -> jax.Array:
    """`train` switches dropout, and BatchNorm too unless `bn_train` is given (frozen BN)."""
    inter = max(1, x.shape[-1] // 4)
    x = layers.conv2d(inter, 3, use_bias=False, dtype=self.dtype, name='conv')(x)
    x = layers.batch_norm(train if bn_train is None else bn_train,
                          axis_name=self.bn_axis_name, dtype=self.dtype, name='bn')(x)
    x = nn.Dropout(self.dropout_rate, deterministic=not train)(nn.relu(x))
    return layers.conv2d(self.num_classes, 1, dtype=self.dtype, name='classifier')(x)


class FCN(nn.Module):
  """FCN-{32,16,8}s.

  Attributes:
    backbone: a module whose `__call__(x, train=)` returns a feature dict and
      whose `feature_strides()` gives each map's stride.
    num_classes: output channels.
    skips: 0 (FCN-32s), 1 (FCN-16s) or 2 (FCN-8s).
    feature_names: (stride-8 skip, stride-16 skip, top) keys of the backbone dict.
    upsampling: one of UPSAMPLING.
    aux_loss: add the auxiliary FCNHead on feature_names[1].
    dtype: compute dtype of the score layers; logits are float32.
  """
  backbone: nn.Module
  num_classes: int
  skips: int = 2
  feature_names: tuple[str, str, str] = ('pool3', 'pool4', 'fc7')
  upsampling: str = 'deconv'
  aux_loss: bool = False
  bn_axis_name: str | None = None
  dtype: Any = jnp.float32

  def _upsample(self, x: jax.Array, factor: int, name: str) -> jax.Array:
    """[B, h, w, K] -> [B, f*h, f*w, K] on the half-pixel grid, float32."""
    if factor == 1:
      return x
    if self.upsampling == 'bilinear':
      return layers.bilinear_resize(x, (x.shape[1] * factor, x.shape[2] * factor),
                                    align_corners=False)
    if self.upsampling in ('deconv', 'deconv_frozen'):
      return layers.BilinearDeconv(factor, learnable=self.upsampling == 'deconv',
                                   name=name)(x)
    raise ValueError(f'upsampling must be one of {UPSAMPLING}, got {self.upsampling!r}')

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> dict[str, jax.Array]:
    if self.skips not in (0, 1, 2):
      raise ValueError(f'skips must be 0, 1 or 2, got {self.skips}')
    if self.upsampling not in UPSAMPLING:
      raise ValueError(f'upsampling must be one of {UPSAMPLING}, got {self.upsampling!r}')
    height, width = x.shape[1], x.shape[2]
    feats = self.backbone(x, train=train)
    strides = self.backbone.feature_strides()
    pool3, pool4, top = self.feature_names

    def score(name: str, f: jax.Array) -> jax.Array:
      y = layers.conv2d(self.num_classes, 1, dtype=self.dtype,
                        kernel_init=nn.initializers.zeros, name=name)(f)
      return y.astype(jnp.float32)

    def crop(y: jax.Array, h: int, w: int) -> jax.Array:
      return y[:, :h, :w, :]

    # Caffe names: FCN-32s upscore; 16s upscore2, upscore16; 8s upscore2,
    # upscore_pool4, upscore8.
    y = score('score_fr', feats[top])
    stride = strides[top]
    fuse = [(pool4, 'score_pool4', 'upscore2'), (pool3, 'score_pool3', 'upscore_pool4')]
    for skip_name, score_name, up_name in fuse[:self.skips]:
      skip = feats[skip_name]
      y = self._upsample(y, stride // strides[skip_name], up_name)
      y = crop(y, skip.shape[1], skip.shape[2]) + score(score_name, skip)
      stride = strides[skip_name]
    final_name = {0: 'upscore', 1: 'upscore16', 2: 'upscore8'}[self.skips]
    logits = crop(self._upsample(y, stride, final_name), height, width)
    out = {'logits': logits}

    if self.aux_loss:
      aux = FCNHead(self.num_classes, bn_axis_name=self.bn_axis_name, dtype=self.dtype,
                    name='aux_classifier')(feats[pool4], train=train)
      aux = aux.astype(jnp.float32)
      s = strides[pool4]
      aux = layers.bilinear_resize(aux, (aux.shape[1] * s, aux.shape[2] * s),
                                   align_corners=False)
      out['aux_logits'] = crop(aux, height, width)
    return out


FCN32s = partial(FCN, skips=0)
FCN16s = partial(FCN, skips=1)
FCN8s = partial(FCN, skips=2)
