"""torchvision's `fcn_resnet50` / `fcn_resnet101`: FCN with a dilated ResNet and FCNHead.

Not the FCN paper's skip architecture (`segjax.models.fcn`): torchvision's FCN runs a
ResNet at output stride 8 (`replace_stride_with_dilation=[False, True, True]`), puts
an `FCNHead` on res5 (3x3 no-bias conv to C/4 = 512 channels, BN, ReLU, dropout 0.1,
1x1 conv to the classes) and resizes the logits bilinearly (align_corners=False)
straight to the input size; `aux_loss` adds a second FCNHead on res4 (1024 -> 256).
It is DeepLab v3 with `FCNHead` in place of the ASPP head, so it reuses
`deeplab.DeepLabV3` for the backbone call, upsampling, auxiliary head, frozen BN
and multi-scale inputs.

Parameter names mirror torchvision's state_dict (`deeplab.torchvision_name` maps
them): `backbone/...` (`segjax.models.resnet`), `classifier/{conv,bn,classifier}`
-> `classifier.{0,1,4}`, `aux_classifier/{conv,bn,classifier}` -> `aux_classifier.{0,1,4}`.

Outputs: 'logits' [B, H, W, K], 'coarse_logits' [B, ceil(H/s), ceil(W/s), K] at the
output stride s, 'aux_logits' [B, H, W, K] with aux_loss (all float32).
"""

from __future__ import annotations

from segjax.models import deeplab
from segjax.models.fcn import FCNHead

# torchvision's FCNHead: Dropout(0.1) after the ReLU.
FCN_HEAD_DROPOUT = 0.1


class FCNResNet(deeplab.DeepLabV3):
  """`classifier` = FCNHead on the backbone's top map (res5); see the module docstring.

  Build it with `segjax.models.build_model` (registry name 'fcn_resnet'); `atrous_rates`
  is unused (pass ()).
  """
  dropout_rate: float = FCN_HEAD_DROPOUT

  def make_head(self, *, train: bool, bn_train: bool) -> deeplab.HeadFn:
    classifier = FCNHead(self.num_classes, dropout_rate=self.dropout_rate,
                         bn_axis_name=self.bn_axis_name, dtype=self.dtype, name='classifier')

    def head(image, feats):
      del image
      return classifier(feats[self.feature_names.top], train=train, bn_train=bn_train)
    return head
