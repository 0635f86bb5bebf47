"""Faster R-CNN, Mask R-CNN and Mask Scoring R-CNN as flax modules (torchvision's layout).

    model = build_detector(default_detection_model_config('mask_rcnn'), num_classes=11)
    variables = model.init({'params': key}, images, train=False)
    # inference: images [B, H, W, 3] normalised, image_sizes [B, 2] (h, w) unpadded
    out = model.apply(variables, images, train=False, image_sizes=sizes)
    out['boxes'] [B, D, 4] (x1, y1, x2, y2) pixels, out['scores'] [B, D],
    out['labels'] [B, D] (1..K-1), out['valid'] [B, D], out['num_detections'] [B],
    out['mask_probs'] [B, D, 28, 28] (Mask R-CNN), out['mask_scores'] [B, D] (MS R-CNN)
    # training: padded ground truth in, (sum, count) loss terms out
    out, updates = model.apply(variables, images, train=True, image_sizes=sizes,
                               targets={'boxes': [B, M, 4], 'labels': [B, M] (1..K-1),
                                        'valid': [B, M] bool, 'masks': [B, M, H, W]},
                               sampling_keys=keys [B], mutable=['batch_stats'])
    losses = finalize_losses(out['loss_terms'])  # {'loss', 'loss_objectness', ...}

Module tree (torchvision `maskrcnn_resnet50_fpn` names): backbone.body (ResNet),
backbone.fpn (inner_blocks_i, layer_blocks_i), rpn.head (conv, cls_logits, bbox_pred),
roi_heads.box_head (fc6, fc7), roi_heads.box_predictor (cls_score, bbox_pred),
roi_heads.mask_head (mask_fcn1..4), roi_heads.mask_predictor (conv5_mask,
mask_fcn_logits), roi_heads.maskiou_head (MS R-CNN). K counts the background class 0.

Static shapes throughout: ground truth padded to M = max_instances; proposals,
sampled RoIs and detections have fixed counts with validity masks (DESIGN.md).
Masks are pasted into the image by `paste_masks_in_image` (bilinear, then > 0.5).
"""

from __future__ import annotations

import numbers
from functools import partial
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from segjax.models import DTYPES, resnet
from segjax.models.detection import anchors as anchors_lib
from segjax.models.detection import rpn as rpn_lib
from segjax.models.detection.fpn import FPN_OUTPUTS, BackboneWithFPN
from segjax.models.detection.roi_heads import RoIHeads, RoIHeadsConfig

BACKBONES = {
    'resnet18': resnet.ResNet18,
    'resnet34': resnet.ResNet34,
    'resnet50': resnet.ResNet50,
    'resnet101': resnet.ResNet101,
}
BOX_LOSSES = ('smooth_l1', 'l1')
ROI_POOLERS = ('roi_align', 'roi_pool')


class MaskRCNN(nn.Module):
  """Backbone + FPN + RPN + RoI heads. `with_mask=False` is Faster R-CNN; `with_maskiou`
  adds Mask Scoring R-CNN's MaskIoU head.

  Attributes:
    backbone: a `BackboneWithFPN`.
    num_classes: K, background included.
    anchor_generator: one anchor size tuple per FPN level P2..P6.
    rpn_config, roi_heads_config: static settings (torchvision defaults).
    box_loss: 'smooth_l1' (beta 1/9, torchvision) or 'l1' for both box losses.
  """
  backbone: nn.Module
  num_classes: int
  anchor_generator: anchors_lib.AnchorGenerator = anchors_lib.AnchorGenerator()
  rpn_config: rpn_lib.RPNConfig = rpn_lib.RPNConfig()
  roi_heads_config: RoIHeadsConfig = RoIHeadsConfig()
  representation_size: int = 1024
  mask_head_channels: int = 256
  with_mask: bool = True
  with_maskiou: bool = False
  box_loss: str = 'smooth_l1'
  dtype: Any = jnp.float32

  def setup(self):
    num_anchors = set(self.anchor_generator.num_anchors_per_location())
    if len(num_anchors) != 1:
      raise ValueError('the shared RPN head needs the same number of anchors per location '
                       f'on every level, got {self.anchor_generator.num_anchors_per_location()}')
    self.rpn = rpn_lib.RegionProposalNetwork(num_anchors.pop(), dtype=self.dtype)
    self.roi_heads = RoIHeads(
        self.num_classes, self.roi_heads_config, self.representation_size,
        self.mask_head_channels, with_mask=self.with_mask or self.with_maskiou,
        with_maskiou=self.with_maskiou, dtype=self.dtype)

  def __call__(self, images: jax.Array, *, train: bool, image_sizes: jax.Array | None = None,
               targets: dict[str, jax.Array] | None = None,
               sampling_keys: jax.Array | None = None) -> dict[str, Any]:
    """Inference outputs (train=False) or {'loss_terms': ..., 'proposals': ...} (train=True).

    `sampling_keys` [B] PRNG keys draw each image's anchor and RoI samples; None takes
    them from the 'sampling' rng stream.
    """
    batch, height, width = images.shape[:3]
    if image_sizes is None:
      image_sizes = jnp.broadcast_to(jnp.asarray([height, width], jnp.int32), (batch, 2))
    features = self.backbone(images, train=train)
    levels = [features[name] for name in FPN_OUTPUTS]
    objectness, deltas = self.rpn(levels)
    shapes = [tuple(f.shape[1:3]) for f in levels]
    anchors = jnp.asarray(self.anchor_generator((height, width), shapes))
    c = self.rpn_config
    proposals = rpn_lib.select_proposals(
        objectness, deltas, anchors, self.anchor_generator.num_anchors_per_level(shapes),
        image_sizes, pre_nms_top_n=c.pre_nms_top_n[0 if train else 1],
        post_nms_top_n=c.post_nms_top_n[0 if train else 1], nms_thresh=c.nms_thresh,
        score_thresh=c.score_thresh, min_size=c.min_size)
    if not train:
      out = self.roi_heads(features, proposals.boxes, proposals.valid, image_sizes)
      out['proposals'] = proposals.boxes
      out['proposals_valid'] = proposals.valid
      return out

    if targets is None:
      raise ValueError('MaskRCNN(train=True) needs targets={boxes, labels, valid[, masks]}')
    if sampling_keys is None:
      sampling_keys = jax.random.split(self.make_rng('sampling'), batch)
    rpn_keys, roi_keys = jax.vmap(lambda k: tuple(jax.random.split(k)))(sampling_keys)
    gt_boxes = targets['boxes'].astype(jnp.float32)
    terms = rpn_lib.rpn_loss_terms(objectness, deltas, anchors, gt_boxes, targets['valid'],
                                   rpn_keys, c, box_loss=self.box_loss)
    roi_targets = dict(targets, boxes=gt_boxes)
    terms.update(self.roi_heads.loss_terms(features, proposals.boxes, proposals.valid,
                                           roi_targets, roi_keys, box_loss=self.box_loss))
    return {'loss_terms': terms, 'proposals': proposals.boxes,
            'proposals_valid': proposals.valid}


def finalize_losses(terms: dict[str, tuple[jax.Array, jax.Array]],
                    axis_name: str | None = None) -> dict[str, jax.Array]:
  """(sum, count) terms -> means; 'loss' is their sum (every weight 1, as torchvision).

  Under pmap (`axis_name`) each device divides its sum by the *global* count, so
  psum-ing the gradients gives the gradient of the global-batch loss (steps.py).
  """
  losses = {}
  for name, (total, count) in terms.items():
    if axis_name is not None:
      count = jax.lax.psum(count, axis_name)
    losses[name] = total / jnp.maximum(jax.lax.stop_gradient(count), 1.0)
  losses['loss'] = sum(losses.values())
  return losses


def paste_masks_in_image(mask_probs: jax.Array, boxes: jax.Array,
                         image_size: tuple[int, int]) -> jax.Array:
  """[D, m, m] box-relative masks -> [D, H, W] image-sized probabilities.

  Bilinear resampling of each mask over its box, zero outside (detectron2's
  `paste_masks_in_image`: image pixel centre x + 0.5 maps to mask coordinate
  (x + 0.5 - x1) / (x2 - x1) * m - 0.5, with zero padding around the mask).
  Threshold the result at 0.5 for binary masks. Works on numpy or jax arrays.
  """
  height, width = image_size
  m = mask_probs.shape[-1]

  def weights(lo, hi, n):
    size = jnp.maximum(hi - lo, 1e-6)
    u = (jnp.arange(n, dtype=jnp.float32)[None, :] + 0.5 - lo[:, None]) / size[:, None] * m - 0.5
    return jnp.maximum(0.0, 1.0 - jnp.abs(u[..., None] - jnp.arange(m, dtype=jnp.float32)))

  boxes = jnp.asarray(boxes, jnp.float32)
  wy = weights(boxes[:, 1], boxes[:, 3], height)  # [D, H, m]
  wx = weights(boxes[:, 0], boxes[:, 2], width)  # [D, W, m]
  return jnp.einsum('dhr,drc,dwc->dhw', wy, jnp.asarray(mask_probs, jnp.float32), wx,
                    precision=jax.lax.Precision.HIGHEST)


# ---------------------------------------------------------------------------
# Config schema and construction.

DETECTION_MODELS = {
    'faster_rcnn': dict(with_mask=False, with_maskiou=False),
    'mask_rcnn': dict(with_mask=True, with_maskiou=False),
    'ms_rcnn': dict(with_mask=True, with_maskiou=True),
}


def default_detection_model_config(name: str = 'mask_rcnn') -> ml_collections.ConfigDict:
  """`config.model` of a detector: torchvision's `maskrcnn_resnet50_fpn` settings."""
  if name not in DETECTION_MODELS:
    raise ValueError(f'model.name={name!r} is not a detector; choose one of '
                     f'{sorted(DETECTION_MODELS)}')
  return ml_collections.ConfigDict({
      'name': name,
      'backbone': 'resnet50',
      'width_multiplier': 1.0,
      'freeze_bn': False,          # True: FrozenBatchNorm in the backbone (detectron2)
      'fpn_channels': 256,         # FPN §3 (d = 256)
      'representation_size': 1024,  # TwoMLPHead width (FPN §4.2)
      'mask_head_channels': 256,   # Mask R-CNN Fig. 4
      'anchor_sizes': (32, 64, 128, 256, 512),  # one per level P2..P6 (FPN §4.1)
      'aspect_ratios': (0.5, 1.0, 2.0),
      'rpn_pre_nms_top_n_train': 2000,
      'rpn_pre_nms_top_n_test': 1000,
      'rpn_post_nms_top_n_train': 2000,
      'rpn_post_nms_top_n_test': 1000,
      'rpn_nms_thresh': 0.7,
      'rpn_batch_size_per_image': 256,
      'box_batch_size_per_image': 512,
      'box_positive_fraction': 0.25,
      'box_score_thresh': 0.05,
      'box_nms_thresh': 0.5,
      'box_detections_per_img': 100,
      'box_loss': 'smooth_l1',
      'roi_pooler': 'roi_align',   # | 'roi_pool' (Mask R-CNN Table 2c's baseline)
      'dtype': 'float32',
  })


def _positive_int(c, field):
  v = c[field]
  if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 1:
    raise ValueError(f'model.{field}={v!r} must be an integer >= 1')


def _unit_interval(c, field):
  v = c[field]
  if isinstance(v, bool) or not isinstance(v, numbers.Real) or not 0 <= v <= 1:
    raise ValueError(f'model.{field}={v!r} must be a number in [0, 1]')


def validate_detection_model_config(c: ml_collections.ConfigDict) -> None:
  """Raises ValueError naming the bad field, its value and the valid choices."""
  if c.get('name') not in DETECTION_MODELS:
    raise ValueError(f'model.name={c.get("name")!r} is not a detector; choose one of '
                     f'{sorted(DETECTION_MODELS)}')
  known = set(default_detection_model_config(c.name).keys())
  given = set(c.keys())
  if given != known:
    raise ValueError(f'model config fields differ from the schema: unknown {sorted(given - known)}, '
                     f'missing {sorted(known - given)}; see '
                     f'default_detection_model_config({c.name!r})')
  if c.backbone not in BACKBONES:
    raise ValueError(f'model.backbone={c.backbone!r} is not valid for {c.name}; choose one of '
                     f'{sorted(BACKBONES)}')
  if c.box_loss not in BOX_LOSSES:
    raise ValueError(f'model.box_loss={c.box_loss!r} is not one of {BOX_LOSSES}')
  if c.dtype not in DTYPES:
    raise ValueError(f'model.dtype={c.dtype!r} is not one of {sorted(DTYPES)}')
  if c.roi_pooler not in ROI_POOLERS:
    raise ValueError(f'model.roi_pooler={c.roi_pooler!r} is not one of {ROI_POOLERS}')
  if isinstance(c.width_multiplier, bool) or not c.width_multiplier > 0:
    raise ValueError(f'model.width_multiplier={c.width_multiplier!r} must be a number > 0')
  if not isinstance(c.freeze_bn, bool):
    raise ValueError(f'model.freeze_bn={c.freeze_bn!r} must be True or False')
  for field in ('fpn_channels', 'representation_size', 'mask_head_channels',
                'rpn_pre_nms_top_n_train', 'rpn_pre_nms_top_n_test', 'rpn_post_nms_top_n_train',
                'rpn_post_nms_top_n_test', 'rpn_batch_size_per_image',
                'box_batch_size_per_image', 'box_detections_per_img'):
    _positive_int(c, field)
  for field in ('box_positive_fraction', 'box_score_thresh', 'box_nms_thresh', 'rpn_nms_thresh'):
    _unit_interval(c, field)
  sizes = tuple(c.anchor_sizes)
  if len(sizes) != len(FPN_OUTPUTS) or any(not s > 0 for s in sizes):
    raise ValueError(f'model.anchor_sizes={sizes!r} must be {len(FPN_OUTPUTS)} positive sizes, '
                     f'one per FPN level {FPN_OUTPUTS}')
  ratios = tuple(c.aspect_ratios)
  if not ratios or any(not r > 0 for r in ratios):
    raise ValueError(f'model.aspect_ratios={ratios!r} must be positive numbers')


def build_detector(model_config: ml_collections.ConfigDict, *, num_classes: int,
                   bn_axis_name: str | None = None) -> MaskRCNN:
  """Validates `model_config` and builds the detector it names (K = num_classes)."""
  validate_detection_model_config(model_config)
  if isinstance(num_classes, bool) or not isinstance(num_classes, numbers.Integral) or num_classes < 2:
    raise ValueError(f'num_classes={num_classes!r} must be an integer >= 2 (background included)')
  c = model_config
  dtype = DTYPES[c.dtype]
  body = BACKBONES[c.backbone](width_multiplier=float(c.width_multiplier), output_stride=32,
                               bn_axis_name=bn_axis_name, dtype=dtype)
  backbone = BackboneWithFPN(body, int(c.fpn_channels), freeze_bn=bool(c.freeze_bn), dtype=dtype)
  ratios = tuple(float(r) for r in c.aspect_ratios)
  anchor_generator = anchors_lib.AnchorGenerator(
      tuple((float(s),) for s in c.anchor_sizes), (ratios,) * len(FPN_OUTPUTS))
  rpn_config = rpn_lib.RPNConfig(
      pre_nms_top_n=(int(c.rpn_pre_nms_top_n_train), int(c.rpn_pre_nms_top_n_test)),
      post_nms_top_n=(int(c.rpn_post_nms_top_n_train), int(c.rpn_post_nms_top_n_test)),
      nms_thresh=float(c.rpn_nms_thresh), batch_size_per_image=int(c.rpn_batch_size_per_image))
  roi_config = RoIHeadsConfig(
      batch_size_per_image=int(c.box_batch_size_per_image),
      positive_fraction=float(c.box_positive_fraction), score_thresh=float(c.box_score_thresh),
      nms_thresh=float(c.box_nms_thresh), detections_per_img=int(c.box_detections_per_img),
      pooler=c.roi_pooler)
  return MaskRCNN(backbone=backbone, num_classes=int(num_classes),
                  anchor_generator=anchor_generator, rpn_config=rpn_config,
                  roi_heads_config=roi_config, representation_size=int(c.representation_size),
                  mask_head_channels=int(c.mask_head_channels), box_loss=c.box_loss,
                  dtype=dtype, **DETECTION_MODELS[c.name])


FasterRCNN = partial(MaskRCNN, with_mask=False, with_maskiou=False)
MaskScoringRCNN = partial(MaskRCNN, with_mask=True, with_maskiou=True)
