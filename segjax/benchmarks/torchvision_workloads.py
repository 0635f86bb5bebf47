"""torchvision's side of a benchmark: the model equivalent to a segjax config.

| segjax config (model fields)                            | torchvision              |
|---------------------------------------------------------|--------------------------|
| fcn_resnet, backbone resnet50, output_stride 8          | `fcn_resnet50`           |
| deeplab_v3, backbone resnet50, output_stride 8          | `deeplabv3_resnet50`     |
| mask_rcnn, backbone resnet50, width 1, freeze_bn False  | `maskrcnn_resnet50_fpn`  |

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


def equivalent(config: ml_collections.ConfigDict) -> str:
  """The torchvision builder name equivalent to `config`'s model; raises naming what differs."""
  m = config.model
  if m.name in INSTANCE:
    wanted = {'backbone': 'resnet50', 'width_multiplier': 1.0, 'freeze_bn': False}
    builder = INSTANCE[m.name]
  elif m.name in SEMANTIC:
    wanted = {'backbone': 'resnet50', 'output_stride': 8, 'width_multiplier': 1.0,
              'input_scales': (), 'stem_stride': 4}
    builder = SEMANTIC[m.name]
  else:
    raise ValueError(f'model.name={m.name!r} has no torchvision equivalent in the benchmark; '
                     f'choose one of {sorted({**SEMANTIC, **INSTANCE})}')
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


def semantic_model(config: ml_collections.ConfigDict):
  import torch
  import torchvision.models.segmentation as seg
  builder = getattr(seg, equivalent(config))
  torch.manual_seed(config.seed)
  return builder(weights=None, weights_backbone=None, num_classes=config.dataset.num_classes,
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
             *, name: str = 'torchvision', count_flops: bool = True) -> Workload:
  """torchvision's `mode` step on the same `batch` (the segjax layout, transposed here)."""
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
  else:
    model.eval()

    def step():
      with torch.inference_mode():
        model(image_list) if instance else model(images)

  flops = _torch_flops(step) if count_flops else None
  return Workload(name=name, step=step, images_per_step=int(images.shape[0]),
                  flops_per_step=flops, info={'builder': equivalent(config),
                                              'threads': torch.get_num_threads()})
