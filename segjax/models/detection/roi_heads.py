"""RoI heads of Faster / Mask / Mask Scoring R-CNN with static shapes.

Box branch (Fast R-CNN, Girshick 2015; FPN §4.2): MultiScaleRoIAlign 7x7 (sampling 2)
on P2..P5 -> `box_head` (TwoMLPHead: fc6, fc7, 1024 wide, ReLU) -> `box_predictor`
(`cls_score` K logits, `bbox_pred` 4K class-specific deltas, BoxCoder (10, 10, 5, 5)).
Loss: softmax cross-entropy over the sampled RoIs + smooth-L1 (beta 1/9) on the
positives' deltas of their class, both divided by the number of sampled RoIs
(torchvision's `fastrcnn_loss`).

Mask branch (Mask R-CNN, He et al. 2017 §3, Fig. 4 right): MultiScaleRoIAlign 14x14 ->
`mask_head` (mask_fcn1..4: 3x3 conv, ReLU) -> `mask_predictor` (`conv5_mask`: 2x2
stride-2 transposed conv, ReLU; `mask_fcn_logits`: 1x1 conv to K) -> 28x28 per-class
logits. Loss: per-pixel binary cross-entropy of the ground-truth class's channel only,
on positive RoIs, against the matched mask RoIAligned to 28x28 (mean over pixels).

MaskIoU branch (Mask Scoring R-CNN, Huang et al. CVPR 2019 §3.2): the predicted
28x28 mask of the RoI's class (probabilities, max-pooled 2x2 to 14x14, no gradient)
concatenated with the 14x14 RoI features -> 4 convs 3x3 (the last stride 2; names
`maskiou_fcn1..4` as the authors' code) -> `maskiou_fc1`, `maskiou_fc2` (1024) ->
`maskiou` (K outputs). Target: IoU between the binarised (> 0.5) predicted mask and
the binarised 28x28 target of the matched instance; loss: squared error (L2) on
positives. At inference the mask score is cls score x predicted MaskIoU (§3.3).
Simplification (stated): the paper's target uses the whole ground-truth mask area; here
both masks are compared inside the RoI's 28x28 grid only.

Sampling (torchvision's `RoIHeads`): ground-truth boxes are appended to the proposals,
proposals are matched at IoU 0.5, 512 are sampled per image with at most 25% positives
(`matching.sample_balanced`, positives first). The mask branch sees the first
`int(512 * 0.25)` sampled slots, which hold every sampled positive; the others are
masked out of the loss. It runs on only the first 16, 32, 64 or 128 of them, the
smallest that holds every image's positives (`RoIHeadsConfig.mask_roi_buckets`, a
`switch` between static sizes): the same loss and gradients for less work.

Inference (`postprocess_detections`): softmax scores, class-specific boxes clipped to
the image, score > 0.05, tiny boxes dropped, class-aware NMS 0.5, the best 100 kept in a
fixed number of slots with `valid` / `num_detections`.

Layout notes for importing torchvision weights: `fc6` sees the 7x7xC RoI features
flattened in NHWC order (torchvision flattens C, 7, 7); `bbox_pred` outputs are
(class, coordinate) like torchvision's `[K * 4]`; `conv5_mask` uses
`layers.conv_transpose_torch` (PyTorch's ConvTranspose2d semantics, kernel
`w.transpose(2, 3, 0, 1)`).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from segjax.models import layers
from segjax.models.detection import boxes as box_ops
from segjax.models.detection import matching, nms
from segjax.models.detection.multiscale_roi_align import (multiscale_roi_align,
                                                          multiscale_roi_pool)
from segjax.models.detection.rpn import SMOOTH_L1_BETA, smooth_l1

ROI_FEATURES = ('p2', 'p3', 'p4', 'p5')  # torchvision's featmap_names ['0', '1', '2', '3']

# torch.nn.Linear's default init: U(+-1/sqrt(fan_in)) for weights (kaiming_uniform a=sqrt(5)).
_linear_init = nn.initializers.variance_scaling(1.0 / 3, 'fan_in', 'uniform')


@dataclasses.dataclass(frozen=True)
class RoIHeadsConfig:
  """Static RoI-head settings (torchvision's `maskrcnn_resnet50_fpn` defaults)."""
  fg_iou_thresh: float = 0.5
  bg_iou_thresh: float = 0.5
  batch_size_per_image: int = 512
  positive_fraction: float = 0.25
  bbox_reg_weights: tuple[float, float, float, float] = (10.0, 10.0, 5.0, 5.0)
  score_thresh: float = 0.05
  nms_thresh: float = 0.5
  detections_per_img: int = 100
  min_size: float = 1e-2
  box_roi_size: int = 7
  mask_roi_size: int = 14
  sampling_ratio: int = 2
  # 'roi_align' (Mask R-CNN) | 'roi_pool' (Fast R-CNN's quantised pooling; the
  # Mask R-CNN paper's Table 2c baseline).
  pooler: str = 'roi_align'
  # Training runs the mask branch on the first b slots, b the smallest of
  # `mask_roi_buckets` holding every image's positives (lax.switch: one compiled branch
  # per size, only the chosen one runs). The loss and gradients equal those of all
  # `num_mask_rois` slots, since slots past the positives are masked out anyway.
  # False: always all slots.
  mask_roi_buckets: bool = True

  @property
  def box_coder(self) -> box_ops.BoxCoder:
    return box_ops.BoxCoder(self.bbox_reg_weights)

  @property
  def num_mask_rois(self) -> int:
    """Mask-branch slots per image: the most positives the sampler can draw."""
    return max(1, int(self.batch_size_per_image * self.positive_fraction))

  @property
  def mask_bucket_sizes(self) -> tuple[int, ...]:
    """Slot counts the training mask branch may run on: 16, 32, ... up to num_mask_rois."""
    n = self.num_mask_rois
    if not self.mask_roi_buckets:
      return (n,)
    sizes, b = [], 16
    while b < n:
      sizes.append(b)
      b *= 2
    return tuple(sizes) + (n,)


class TwoMLPHead(nn.Module):
  """[..., P, P, C] RoI features -> [..., representation_size] (fc6, fc7, ReLU)."""
  representation_size: int = 1024
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = x.reshape(x.shape[:-3] + (-1,))
    x = nn.relu(nn.Dense(self.representation_size, dtype=self.dtype,
                         kernel_init=_linear_init, name='fc6')(x))
    return nn.relu(nn.Dense(self.representation_size, dtype=self.dtype,
                            kernel_init=_linear_init, name='fc7')(x))


class FastRCNNPredictor(nn.Module):
  """-> class logits [..., K], class-specific deltas [..., K, 4].

  Init std 0.01 / 0.001 (Detectron's): torchvision keeps nn.Linear's default, which
  trains the same from pre-trained weights; the small init is steadier from scratch.
  """
  num_classes: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    logits = nn.Dense(self.num_classes, dtype=self.dtype,
                      kernel_init=nn.initializers.normal(0.01), name='cls_score')(x)
    deltas = nn.Dense(4 * self.num_classes, dtype=self.dtype,
                      kernel_init=nn.initializers.normal(0.001), name='bbox_pred')(x)
    return (logits.astype(jnp.float32),
            deltas.reshape(deltas.shape[:-1] + (self.num_classes, 4)).astype(jnp.float32))


class MaskRCNNHeads(nn.Module):
  """Four 3x3 convs + ReLU (mask_fcn1..4), torchvision's MaskRCNNHeads."""
  channels: int = 256
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    for i in range(1, 5):
      x = nn.relu(layers.conv2d(self.channels, 3, dtype=self.dtype, name=f'mask_fcn{i}')(x))
    return x


class MaskRCNNPredictor(nn.Module):
  """conv5_mask (2x2 stride-2 transposed conv, ReLU) -> mask_fcn_logits (1x1, K): 14 -> 28."""
  num_classes: int
  channels: int = 256
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    lead = x.shape[:-3]
    x = x.reshape((-1,) + x.shape[-3:])
    kernel = self.param('conv5_mask_kernel', layers.kaiming_normal_fan_out,
                        (2, 2, x.shape[-1], self.channels))
    bias = self.param('conv5_mask_bias', nn.initializers.zeros, (self.channels,))
    x = nn.relu(layers.conv_transpose_torch(x, kernel.astype(self.dtype), 2, 0) + bias)
    x = layers.conv2d(self.num_classes, 1, dtype=self.dtype, name='mask_fcn_logits')(x)
    return x.reshape(lead + x.shape[1:]).astype(jnp.float32)


class MaskIoUHead(nn.Module):
  """Mask Scoring R-CNN §3.2: (RoI features, predicted mask) -> MaskIoU per class [..., K]."""
  num_classes: int
  channels: int = 256
  representation_size: int = 1024
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, features: jax.Array, mask_probs: jax.Array) -> jax.Array:
    """features [..., 14, 14, C]; mask_probs [..., 28, 28] of the RoI's class."""
    lead = features.shape[:-3]
    x = features.reshape((-1,) + features.shape[-3:])
    m = mask_probs.reshape((-1,) + mask_probs.shape[-2:] + (1,))
    m = nn.max_pool(m.astype(x.dtype), (2, 2), strides=(2, 2))
    x = jnp.concatenate([x, m], axis=-1)
    for i in range(1, 5):
      x = nn.relu(layers.conv2d(self.channels, 3, strides=2 if i == 4 else 1, dtype=self.dtype,
                                name=f'maskiou_fcn{i}')(x))
    x = x.reshape(x.shape[0], -1)
    for i in (1, 2):
      x = nn.relu(nn.Dense(self.representation_size, dtype=self.dtype,
                           kernel_init=_linear_init, name=f'maskiou_fc{i}')(x))
    x = nn.Dense(self.num_classes, dtype=self.dtype, kernel_init=nn.initializers.normal(0.01),
                 name='maskiou')(x)
    return x.reshape(lead + (self.num_classes,)).astype(jnp.float32)


class SampledRoIs(NamedTuple):
  """Per image S = batch_size_per_image slots: rois [B, S, 4], labels [B, S] (0 background),
  valid / positive [B, S], matched_idxs [B, S], regression_targets [B, S, 4]."""
  rois: jax.Array
  labels: jax.Array
  valid: jax.Array
  positive: jax.Array
  matched_idxs: jax.Array
  regression_targets: jax.Array


def sample_rois(proposals: jax.Array, proposals_valid: jax.Array, gt_boxes: jax.Array,
                gt_labels: jax.Array, gt_valid: jax.Array, keys: jax.Array,
                config: RoIHeadsConfig) -> SampledRoIs:
  """torchvision's `select_training_samples` for a batch (ground truth appended first)."""
  matcher = matching.Matcher(config.fg_iou_thresh, config.bg_iou_thresh)
  coder = config.box_coder

  def one_image(props, props_valid, boxes, labels, valid, key):
    all_boxes = jnp.concatenate([props, boxes.astype(props.dtype)], 0)
    all_valid = jnp.concatenate([props_valid, valid], 0)
    targets = matching.assign_proposal_targets(all_boxes, boxes, labels, valid, matcher,
                                               proposals_valid=all_valid)
    sample = matching.sample_balanced(key, targets.labels, config.batch_size_per_image,
                                      config.positive_fraction)
    idx = jnp.maximum(sample.indices, 0)
    rois = jnp.where(sample.valid[:, None], all_boxes[idx], 0.0)
    roi_labels = jnp.where(sample.positive, targets.labels[idx], 0)
    reg = matching.encode_regression_targets(coder, targets.matched_gt_boxes[idx], rois,
                                             sample.positive)
    return SampledRoIs(rois, roi_labels, sample.valid, sample.positive,
                       targets.matched_idxs[idx], reg)

  sampled = jax.vmap(one_image)(proposals, proposals_valid, gt_boxes, gt_labels, gt_valid, keys)
  return sampled._replace(rois=jax.lax.stop_gradient(sampled.rois))


def mask_iou_targets(mask_logits: jax.Array, mask_targets: jax.Array) -> jax.Array:
  """IoU of binarised (> 0.5) predicted masks and targets [..., 28, 28] -> [...] (no gradient)."""
  pred = jax.lax.stop_gradient(mask_logits) > 0.0  # sigmoid > 0.5
  gt = mask_targets > 0.5
  inter = jnp.sum(pred & gt, axis=(-2, -1)).astype(jnp.float32)
  union = jnp.sum(pred | gt, axis=(-2, -1)).astype(jnp.float32)
  return jnp.where(union > 0, inter / jnp.maximum(union, 1.0), 0.0)


class Detections(NamedTuple):
  """D = detections_per_img slots per image, best first; padding: valid False, zeros."""
  boxes: jax.Array  # [B, D, 4]
  scores: jax.Array  # [B, D]
  labels: jax.Array  # [B, D] int32, 1..K-1 (0 in padding)
  valid: jax.Array  # [B, D] bool


def postprocess_detections(class_logits: jax.Array, box_deltas: jax.Array, proposals: jax.Array,
                           proposals_valid: jax.Array, image_sizes: jax.Array,
                           config: RoIHeadsConfig) -> Detections:
  """torchvision's `RoIHeads.postprocess_detections` with static counts.

  Args:
    class_logits: [B, P, K]; box_deltas: [B, P, K, 4]; proposals: [B, P, 4];
    proposals_valid: [B, P]; image_sizes: [B, 2] (height, width).
  """
  coder = config.box_coder
  num_classes = class_logits.shape[-1]

  def one_image(logits, deltas, props, props_valid, size):
    scores = jax.nn.softmax(logits, -1)[:, 1:]
    boxes = coder.decode(deltas, props[:, None, :])[:, 1:]
    boxes = box_ops.clip_boxes_to_image(boxes, size)
    labels = jnp.broadcast_to(jnp.arange(1, num_classes, dtype=jnp.int32), scores.shape)
    boxes, scores, labels = boxes.reshape(-1, 4), scores.reshape(-1), labels.reshape(-1)
    keep = (jnp.repeat(props_valid, num_classes - 1) & (scores > config.score_thresh)
            & box_ops.remove_small_boxes(boxes, config.min_size))
    kept = nms.batched_nms(boxes, scores, labels, config.nms_thresh,
                           config.detections_per_img, valid=keep)
    idx = jnp.maximum(kept.indices, 0)
    v = kept.valid
    return Detections(jnp.where(v[:, None], boxes[idx], 0.0), jnp.where(v, scores[idx], 0.0),
                      jnp.where(v, labels[idx], 0), v)

  return Detections(*jax.vmap(one_image)(class_logits, box_deltas, proposals, proposals_valid,
                                         image_sizes))


def select_class(x: jax.Array, labels: jax.Array) -> jax.Array:
  """x [..., K] or [..., H, W, K] picked at `labels` [...] -> [...] or [..., H, W]."""
  if x.ndim == labels.ndim + 1:
    return jnp.take_along_axis(x, labels[..., None], -1)[..., 0]
  one_hot = jax.nn.one_hot(labels, x.shape[-1], dtype=x.dtype)
  return jnp.einsum('...hwk,...k->...hw', x, one_hot)


class RoIHeads(nn.Module):
  """Box (+ mask, + MaskIoU) heads on FPN features; see the module docstring.

  `__call__` runs inference; `loss_terms` computes the training losses. Both are
  reachable through `MaskRCNN`.
  """
  num_classes: int
  config: RoIHeadsConfig = RoIHeadsConfig()
  representation_size: int = 1024
  mask_head_channels: int = 256
  with_mask: bool = True
  with_maskiou: bool = False
  dtype: Any = jnp.float32

  def setup(self):
    self.box_head = TwoMLPHead(self.representation_size, dtype=self.dtype)
    self.box_predictor = FastRCNNPredictor(self.num_classes, dtype=self.dtype)
    if self.with_mask:
      self.mask_head = MaskRCNNHeads(self.mask_head_channels, dtype=self.dtype)
      self.mask_predictor = MaskRCNNPredictor(self.num_classes, self.mask_head_channels,
                                              dtype=self.dtype)
    if self.with_maskiou:
      self.maskiou_head = MaskIoUHead(self.num_classes, self.mask_head_channels,
                                      self.representation_size, dtype=self.dtype)

  def _pool(self, features, boxes, size):
    levels = [features[name] for name in ROI_FEATURES]
    image_shape = tuple(int(s) * 4 for s in levels[0].shape[1:3])
    if self.config.pooler == 'roi_pool':
      return multiscale_roi_pool(levels, jax.lax.stop_gradient(boxes), image_shape, size)
    return multiscale_roi_align(levels, jax.lax.stop_gradient(boxes), image_shape, size,
                                sampling_ratio=self.config.sampling_ratio)

  def _boxes(self, features, rois):
    x = self.box_head(self._pool(features, rois, self.config.box_roi_size))
    return self.box_predictor(x)

  def _masks(self, features, rois):
    mask_features = self._pool(features, rois, self.config.mask_roi_size)
    return mask_features, self.mask_predictor(self.mask_head(mask_features))

  def __call__(self, features: dict[str, jax.Array], proposals: jax.Array,
               proposals_valid: jax.Array, image_sizes: jax.Array) -> dict[str, jax.Array]:
    """Inference: detections (+ 'mask_probs' [B, D, 28, 28] of the detected class)."""
    class_logits, deltas = self._boxes(features, proposals)
    det = postprocess_detections(class_logits, deltas, proposals, proposals_valid, image_sizes,
                                 self.config)
    out = {'boxes': det.boxes, 'scores': det.scores, 'labels': det.labels, 'valid': det.valid,
           'num_detections': jnp.sum(det.valid, -1, dtype=jnp.int32)}
    if self.with_mask:
      mask_features, mask_logits = self._masks(features, det.boxes)
      logits = select_class(mask_logits, det.labels)
      out['mask_probs'] = jax.nn.sigmoid(logits)
      if self.with_maskiou:
        iou = select_class(self.maskiou_head(mask_features, out['mask_probs']), det.labels)
        out['maskiou'] = iou
        out['mask_scores'] = jnp.where(det.valid, det.scores * iou, 0.0)
    return out

  def loss_terms(self, features: dict[str, jax.Array], proposals: jax.Array,
                 proposals_valid: jax.Array, targets: dict[str, jax.Array],
                 keys: jax.Array, *, box_loss: str = 'smooth_l1'
                 ) -> dict[str, tuple[jax.Array, jax.Array]]:
    """Training losses as (sum, count) pairs; `targets` as `MaskRCNN` documents."""
    c = self.config
    sampled = sample_rois(proposals, proposals_valid, targets['boxes'], targets['labels'],
                          targets['valid'], keys, c)
    class_logits, deltas = self._boxes(features, sampled.rois)
    num_sampled = jnp.sum(sampled.valid, dtype=jnp.float32)
    ce = optax.softmax_cross_entropy_with_integer_labels(class_logits, sampled.labels)
    terms = {'loss_classifier': (jnp.sum(jnp.where(sampled.valid, ce, 0.0)), num_sampled)}
    beta = SMOOTH_L1_BETA if box_loss == 'smooth_l1' else 0.0
    class_deltas = jnp.take_along_axis(deltas, sampled.labels[..., None, None], -2)[..., 0, :]
    reg = jnp.sum(smooth_l1(class_deltas - sampled.regression_targets, beta), -1)
    terms['loss_box_reg'] = (jnp.sum(jnp.where(sampled.positive, reg, 0.0)), num_sampled)
    if not self.with_mask:
      return terms

    n = c.num_mask_rois
    # Positives come first in the sampled slots (matching.sample_balanced).
    max_positives = jnp.max(jnp.sum(sampled.positive[:, :n], -1))
    sizes = c.mask_bucket_sizes
    index = jnp.sum(max_positives > jnp.asarray(sizes[:-1], jnp.int32)).astype(jnp.int32)
    branches = [functools.partial(_mask_loss_terms, slots=b) for b in sizes]
    operands = (features, sampled, targets['masks'])
    if len(branches) == 1:
      mask_terms = branches[0](self, *operands)
    else:
      # Inside a conditional XLA CPU runs a conv's own filter gradient ~80x slower than
      # outside (3.8 s vs 45 ms, 3x3x256 conv on 16 RoIs of 14x14;
      # segjax.benchmarks.nested_conv_bench); per-tap matmuls stay fast there. On CPU
      # the mask head's 256->256 convs are tap matmuls throughout (Winograd forward,
      # both gradients as matmuls: no XLA conv in the branch), which made the Mask
      # R-CNN R50-FPN train step 1.24x as fast as with 'taps' (XLA's forward and input
      # gradient, 66 GFLOP/s inside the conditional).
      nested = ('tap_matmuls_nested' if layers.current_conv_weight_grad() == 'tap_matmuls'
                else 'taps')
      with layers.conv_weight_grad(nested):
        mask_terms = nn.switch(index, branches, self, *operands)
    terms.update(mask_terms)
    return terms


def _mask_loss_terms(heads: RoIHeads, features, sampled: SampledRoIs, gt_masks: jax.Array, *,
                     slots: int) -> dict[str, tuple[jax.Array, jax.Array]]:
  """Mask (and MaskIoU) loss terms over the first `slots` sampled RoIs of each image."""
  rois, positive = sampled.rois[:, :slots], sampled.positive[:, :slots]
  labels, matched = sampled.labels[:, :slots], sampled.matched_idxs[:, :slots]
  mask_features, mask_logits = heads._masks(features, rois)  # pylint: disable=protected-access
  logits = select_class(mask_logits, labels)
  size = logits.shape[-1]
  mask_targets = jax.vmap(
      lambda m, b, i: matching.project_masks_on_boxes(m, b, i, size))(gt_masks, rois, matched)
  bce = jnp.sum(optax.sigmoid_binary_cross_entropy(logits, mask_targets), (-2, -1))
  num_pos = jnp.sum(positive, dtype=jnp.float32)
  terms = {'loss_mask': (jnp.sum(jnp.where(positive, bce, 0.0)), num_pos * size * size)}
  if heads.with_maskiou:
    probs = jax.lax.stop_gradient(jax.nn.sigmoid(logits))
    pred_iou = select_class(heads.maskiou_head(mask_features, probs), labels)
    target_iou = mask_iou_targets(logits, mask_targets)
    sq = jnp.square(pred_iou - target_iou)
    terms['loss_maskiou'] = (jnp.sum(jnp.where(positive, sq, 0.0)), num_pos)
  return terms
