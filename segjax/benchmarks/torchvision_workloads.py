"""torchvision's side of a benchmark: the model equivalent to a segjax config.

| segjax config (model fields)                            | torchvision              |
|---------------------------------------------------------|--------------------------|
| fcn_resnet, backbone resnet50, output_stride 8          | `fcn_resnet50`           |
| deeplab_v3, backbone resnet50, output_stride 8          | `deeplabv3_resnet50`     |
| mask_rcnn, backbone resnet50, width 1, freeze_bn False  | `maskrcnn_resnet50_fpn`  |
| fcn32s/16s/8s, backbone vgg16, width 1, fc6 7x7, deconv | `vgg16`, as FCN (below)  |

torchvision has no FCN on VGG-16, the paper's network. Its side of an FCN-VGG row is
`fcn_vgg16`: torchvision's own `vgg16` modules and initialisation, convolutionalised as
in FCN §3.1 (the classifier's first two Linear layers reshaped into the 7x7 fc6 and 1x1
fc7 convolutions, the 1000-way layer dropped), plus FCN's zero-initialised score layers
and bilinear-initialised `ConvTranspose2d` upsampling (§3.3, §4.2), built here as
segjax's `FCN` builds them: max pools rounding up, fc6 padded to keep its size, crops at
offset 0. `tests/test_benchmark.py` loads one side's weights into the other and checks
that the logits agree.

Both sides start from random weights of the same kind (torchvision's own init, which
segjax's initialisers mirror: Kaiming-normal fan-out convs, BN 1/0); `weights=None,
weights_backbone=None`, so torchvision's detector trains BatchNorm in every backbone
layer like segjax with `freeze_bn=False`. The train step is forward, the loss,
backward and `torch.optim.SGD` with the config's momentum and weight decay. The
detector gets `min_size`/`max_size` = the image size (no resize in its transform) and
the config's proposal / detection counts and score threshold.

Inputs are the segjax ones transposed to NCHW; threads: `torch.set_num_threads(n)`
with n = XLA's CPU thread count (one per core).
"""

from __future__ import annotations

import os

import ml_collections
import numpy as np

from segjax.benchmarks.measure import Workload

SEMANTIC = {'deeplab_v3': 'deeplabv3_resnet50', 'fcn_resnet': 'fcn_resnet50'}
INSTANCE = {'mask_rcnn': 'maskrcnn_resnet50_fpn'}
FCN_VGG = {'fcn32s': 0, 'fcn16s': 1, 'fcn8s': 2}  # model name -> skips


def equivalent(config: ml_collections.ConfigDict) -> str:
  """The torchvision builder name equivalent to `config`'s model; raises naming what differs."""
  m = config.model
  if m.name in INSTANCE:
    wanted = {'backbone': 'resnet50', 'width_multiplier': 1.0, 'freeze_bn': False}
    builder = INSTANCE[m.name]
  elif m.name in FCN_VGG:
    wanted = {'backbone': 'vgg16', 'width_multiplier': 1.0, 'output_stride': 32,
              'fc_kernel_size': 7, 'upsampling': 'deconv', 'aux_loss': False}
    builder = 'vgg16'
  elif m.name in SEMANTIC:
    wanted = {'backbone': 'resnet50', 'output_stride': 8, 'width_multiplier': 1.0,
              'input_scales': (), 'stem_stride': 4}
    builder = SEMANTIC[m.name]
  else:
    raise ValueError(f'model.name={m.name!r} has no torchvision equivalent in the benchmark; '
                     f'choose one of {sorted({**SEMANTIC, **INSTANCE, **FCN_VGG})}')
  wrong = {k: v for k, v in wanted.items()
           if (tuple(m.get(k, v)) if isinstance(v, tuple) else m.get(k, v)) != v}
  if wrong:
    flags = ' '.join(f'--config.model.{k}={v!r}' for k, v in wrong.items())
    raise ValueError(f'{m.name} with {", ".join(f"{k}={m[k]!r}" for k in wrong)} is not '
                     f'torchvision\'s {builder}; add {flags}')
  return builder


def set_threads(threads: int | None = None) -> int:
  import torch
  threads = threads or os.cpu_count() or 1
  torch.set_num_threads(threads)
  return threads


def _torch_flops(fn) -> float | None:
  try:
    from torch.utils.flop_counter import FlopCounterMode
  except ImportError:
    return None
  counter = FlopCounterMode(display=False)
  with counter:
    fn()
  return float(counter.get_total_flops())


def _bilinear_transpose_conv(channels: int, factor: int):
  """FCN's upsampling: `ConvTranspose2d` (kernel 2f - f % 2, stride f, padding f // 2, no
  bias) with the per-channel bilinear filter on its diagonal (segjax `BilinearDeconv`)."""
  import torch
  from segjax.models import layers
  size = layers.bilinear_kernel_size(factor)
  up = torch.nn.ConvTranspose2d(channels, channels, size, stride=factor, padding=factor // 2,
                                bias=False)
  kernel = layers.bilinear_kernel(factor, channels)  # [kh, kw, in, out]
  with torch.no_grad():
    up.weight.copy_(torch.from_numpy(kernel.transpose(2, 3, 0, 1)))
  return up


def fcn_vgg16(num_classes: int, skips: int, dropout_rate: float = 0.5):
  """FCN-32s (skips 0), -16s (1) or -8s (2) on torchvision's `vgg16` (see the module doc).

  Returns a `torch.nn.Module` mapping [B, 3, H, W] to {'out': [B, num_classes, H, W]}.
  """
  import torch
  import torchvision
  from torch import nn

  if skips not in (0, 1, 2):
    raise ValueError(f'skips={skips!r} must be 0 (FCN-32s), 1 (FCN-16s) or 2 (FCN-8s)')

  class FCNVGG16(nn.Module):
    """torchvision's VGG-16 trunk and classifier, convolutionalised, with FCN's head."""

    def __init__(self):
      super().__init__()
      vgg = torchvision.models.vgg16(weights=None)
      for layer in vgg.features:
        if isinstance(layer, nn.MaxPool2d):
          layer.ceil_mode = True  # as segjax (and Caffe's FCN); floor mode on even sizes
      self.features = vgg.features  # torchvision's names: features.N
      linear6, linear7 = vgg.classifier[0], vgg.classifier[3]
      width = linear7.out_features
      self.fc6 = nn.Conv2d(512, width, 7, padding=3)
      self.fc7 = nn.Conv2d(width, width, 1)
      with torch.no_grad():  # torchvision's Linear weights, as convolutions (FCN §3.1)
        self.fc6.weight.copy_(linear6.weight.reshape(width, 512, 7, 7))
        self.fc6.bias.copy_(linear6.bias)
        self.fc7.weight.copy_(linear7.weight[:, :, None, None])
        self.fc7.bias.copy_(linear7.bias)
      self.drop = nn.Dropout(dropout_rate)
      self.score_fr = self._score(width)
      if skips >= 1:
        self.score_pool4 = self._score(512)
        self.upscore2 = _bilinear_transpose_conv(num_classes, 2)
      if skips >= 2:
        self.score_pool3 = self._score(256)
        self.upscore_pool4 = _bilinear_transpose_conv(num_classes, 2)
      self.upscore = _bilinear_transpose_conv(num_classes, {0: 32, 1: 16, 2: 8}[skips])

    @staticmethod
    def _score(channels):
      score = nn.Conv2d(channels, num_classes, 1)
      nn.init.zeros_(score.weight)  # FCN §4.1: the scoring layers start at zero
      nn.init.zeros_(score.bias)
      return score

    def forward(self, x):
      height, width = x.shape[2:]
      # vgg16.features: pool3 is layer 16, pool4 23, pool5 30.
      pool3 = self.features[:17](x)
      pool4 = self.features[17:24](pool3)
      y = self.drop(torch.relu(self.fc6(self.features[24:](pool4))))
      y = self.score_fr(self.drop(torch.relu(self.fc7(y))))
      if skips >= 1:
        y = self.upscore2(y)[:, :, :pool4.shape[2], :pool4.shape[3]] + self.score_pool4(pool4)
      if skips >= 2:
        y = (self.upscore_pool4(y)[:, :, :pool3.shape[2], :pool3.shape[3]]
             + self.score_pool3(pool3))
      return {'out': self.upscore(y)[:, :, :height, :width]}

  return FCNVGG16()


def semantic_model(config: ml_collections.ConfigDict):
  import torch
  import torchvision.models.segmentation as seg
  name = equivalent(config)
  torch.manual_seed(config.seed)
  if name == 'vgg16':
    return fcn_vgg16(config.dataset.num_classes, FCN_VGG[config.model.name],
                     float(config.model.dropout_rate))
  return getattr(seg, name)(weights=None, weights_backbone=None, num_classes=config.dataset.num_classes,
                 aux_loss=bool(config.model.aux_loss))


def instance_model(config: ml_collections.ConfigDict, image_size: tuple[int, int]):
  import torch
  import torchvision.models.detection as det
  builder = getattr(det, equivalent(config))
  m = config.model
  torch.manual_seed(config.seed)
  return builder(
      weights=None, weights_backbone=None, num_classes=config.dataset.num_classes,
      min_size=min(image_size), max_size=max(image_size),
      rpn_pre_nms_top_n_train=m.rpn_pre_nms_top_n_train,
      rpn_pre_nms_top_n_test=m.rpn_pre_nms_top_n_test,
      rpn_post_nms_top_n_train=m.rpn_post_nms_top_n_train,
      rpn_post_nms_top_n_test=m.rpn_post_nms_top_n_test, rpn_nms_thresh=m.rpn_nms_thresh,
      rpn_batch_size_per_image=m.rpn_batch_size_per_image,
      box_batch_size_per_image=m.box_batch_size_per_image,
      box_positive_fraction=m.box_positive_fraction, box_score_thresh=m.box_score_thresh,
      box_nms_thresh=m.box_nms_thresh, box_detections_per_img=m.box_detections_per_img)


def workload(config: ml_collections.ConfigDict, mode: str, batch: dict[str, np.ndarray],
             *, name: str = 'torchvision', count_flops: bool = True,
             same_state: bool = False) -> Workload:
  """torchvision's `mode` step on the same `batch` (the segjax layout, transposed here).

  `same_state` (train): the model's and optimizer's initial state and torch's RNG are
  restored, untimed, before every step, as segjax's side does.
  """
  import torch
  import torch.nn.functional as F
  from segjax.benchmarks.segjax_workloads import is_instance

  set_threads()
  images = torch.from_numpy(np.ascontiguousarray(batch['image'].transpose(0, 3, 1, 2)))
  instance = is_instance(config)
  if instance:
    model = instance_model(config, images.shape[2:])
    image_list = list(images)
    targets = []
    for i in range(images.shape[0]):
      keep = batch['gt_valid'][i]
      targets.append({
          'boxes': torch.from_numpy(batch['gt_boxes'][i][keep]),
          'labels': torch.from_numpy(batch['gt_labels'][i][keep].astype(np.int64)),
          'masks': torch.from_numpy(batch['gt_masks'][i][keep])})
  else:
    model = semantic_model(config)
    labels = torch.from_numpy(batch['label'].astype(np.int64))
    ignore = int(config.dataset.ignore_label)
    aux_weight = float(config.loss.aux_weight)

  if mode == 'train':
    model.train()
    o = config.optimizer
    optimizer = torch.optim.SGD(model.parameters(), lr=o.learning_rate, momentum=o.momentum,
                                weight_decay=o.weight_decay)

    def step():
      optimizer.zero_grad(set_to_none=True)
      if instance:
        loss = sum(model(image_list, targets).values())
      else:
        out = model(images)
        loss = F.cross_entropy(out['out'], labels, ignore_index=ignore)
        if 'aux' in out:
          loss = loss + aux_weight * F.cross_entropy(out['aux'], labels, ignore_index=ignore)
      loss.backward()
      optimizer.step()
      return float(loss)

    before_step = None
    if same_state:
      import copy
      initial_model = copy.deepcopy(model.state_dict())
      initial_optimizer = copy.deepcopy(optimizer.state_dict())  # no momentum yet

      def before_step():
        model.load_state_dict(initial_model)
        optimizer.load_state_dict(initial_optimizer)
        torch.manual_seed(int(config.seed))
  else:
    model.eval()
    before_step = None

    def step():
      with torch.inference_mode():
        model(image_list) if instance else model(images)

  flops = _torch_flops(step) if count_flops else None
  return Workload(name=name, step=step, images_per_step=int(images.shape[0]),
                  flops_per_step=flops, before_step=before_step,
                  info={'builder': equivalent(config), 'threads': torch.get_num_threads()})
