"""Region Proposal Network (Ren et al., NeurIPS 2015 §3.1) on FPN levels, static shapes.

`RPNHead` is torchvision's: a shared 3x3 conv + ReLU, then 1x1 convs to A objectness
logits (`cls_logits`) and 4A box deltas (`bbox_pred`) per position, on every level.
Parameter paths mirror `rpn.head.conv.0.0` / `cls_logits` / `bbox_pred`.

`select_proposals` is torchvision's `RegionProposalNetwork.filter_proposals` with fixed
sizes: per level the `pre_nms_top_n` highest-objectness anchors, decoded and clipped to
the image, tiny boxes (< `min_size`) dropped, NMS at `nms_thresh` separately per level
(`batched_nms` with the level as class), then the `post_nms_top_n` best. Every count is
static; dropped slots carry `valid=False`. Proposals carry no gradient
(`stop_gradient`, as torchvision's `.detach()`).

`rpn_loss_terms`: 256 anchors sampled per image, half positive at most (Matcher 0.7 /
0.3 with low-quality matches, §3.1.2); objectness binary cross-entropy over the sampled
anchors, smooth-L1 (beta 1/9) over the positives' deltas, both divided by the number of
sampled anchors (torchvision). Terms are returned as (sum, count) pairs so a data-parallel
step can divide by the global count (see `mask_rcnn.finalize_losses`).

Anchors are in torchvision's order (`anchors.py`): level, row, column, ratio, size; the
head output `[B, h, w, A]` flattens to it with a reshape.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from segjax.models import layers
from segjax.models.detection import boxes as box_ops
from segjax.models.detection import matching, nms

RPN_BOX_CODER = box_ops.BoxCoder((1.0, 1.0, 1.0, 1.0))
SMOOTH_L1_BETA = 1.0 / 9  # torchvision / Detectron RPN and Fast R-CNN box losses

_head_init = nn.initializers.normal(0.01)  # torchvision RPNHead: normal(std=0.01), bias 0


class RPNHead(nn.Module):
  """Per level [B, h, w, C] -> objectness [B, h*w*A], deltas [B, h*w*A, 4]; levels concatenated."""
  num_anchors: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, features: Sequence[jax.Array]) -> tuple[jax.Array, jax.Array]:
    channels = features[0].shape[-1]
    conv = layers.conv2d(channels, 3, dtype=self.dtype, kernel_init=_head_init, name='conv')
    cls_logits = layers.conv2d(self.num_anchors, 1, dtype=self.dtype, kernel_init=_head_init,
                               name='cls_logits')
    bbox_pred = layers.conv2d(4 * self.num_anchors, 1, dtype=self.dtype,
                              kernel_init=_head_init, name='bbox_pred')
    objectness, deltas = [], []
    for x in features:
      t = nn.relu(conv(x))
      b, h, w, _ = t.shape
      objectness.append(cls_logits(t).reshape(b, h * w * self.num_anchors))
      deltas.append(bbox_pred(t).reshape(b, h * w * self.num_anchors, 4))
    return (jnp.concatenate(objectness, 1).astype(jnp.float32),
            jnp.concatenate(deltas, 1).astype(jnp.float32))


@dataclasses.dataclass(frozen=True)
class RPNConfig:
  """Static RPN settings (torchvision's `maskrcnn_resnet50_fpn` defaults).

  pre/post_nms_top_n are (train, test) pairs: pre per level, post per image.
  """
  pre_nms_top_n: tuple[int, int] = (2000, 1000)
  post_nms_top_n: tuple[int, int] = (2000, 1000)
  nms_thresh: float = 0.7
  fg_iou_thresh: float = 0.7
  bg_iou_thresh: float = 0.3
  batch_size_per_image: int = 256
  positive_fraction: float = 0.5
  score_thresh: float = 0.0
  min_size: float = 1e-3


class Proposals(NamedTuple):
  """boxes [B, P, 4] (no gradient), scores [B, P] objectness probabilities, valid [B, P]."""
  boxes: jax.Array
  scores: jax.Array
  valid: jax.Array


def select_proposals(objectness: jax.Array, deltas: jax.Array, anchors: jax.Array,
                     num_anchors_per_level: Sequence[int], image_sizes: jax.Array, *,
                     pre_nms_top_n: int, post_nms_top_n: int, nms_thresh: float,
                     score_thresh: float = 0.0, min_size: float = 1e-3) -> Proposals:
  """Proposals of a batch, torchvision's `filter_proposals` with static counts.

  Args:
    objectness: [B, A] logits; deltas: [B, A, 4]; anchors: [A, 4] (shared by the batch).
    num_anchors_per_level: static split of the A axis.
    image_sizes: [B, 2] int (height, width) of each unpadded image; boxes are clipped to it.
    pre_nms_top_n: per level; post_nms_top_n: per image (output P).
  Returns:
    `Proposals` with P = post_nms_top_n slots (fewer real ones: valid False).
  """
  objectness = jax.lax.stop_gradient(objectness)
  deltas = jax.lax.stop_gradient(deltas)
  boxes = RPN_BOX_CODER.decode(deltas, anchors[None])
  top_scores, top_boxes, top_levels = [], [], []
  start = 0
  for level, count in enumerate(num_anchors_per_level):
    k = min(pre_nms_top_n, count)
    scores, idx = jax.lax.top_k(objectness[:, start:start + count], k)
    top_scores.append(scores)
    top_boxes.append(jnp.take_along_axis(boxes[:, start:start + count], idx[..., None], 1))
    top_levels.append(jnp.full(scores.shape, level, jnp.int32))
    start += count
  logits = jnp.concatenate(top_scores, 1)
  boxes = jnp.concatenate(top_boxes, 1)
  levels = jnp.concatenate(top_levels, 1)

  def one_image(logits, boxes, levels, size):
    boxes = box_ops.clip_boxes_to_image(boxes, size)
    probs = jax.nn.sigmoid(logits)
    keep = box_ops.remove_small_boxes(boxes, min_size) & (probs >= score_thresh)
    kept = nms.batched_nms(boxes, probs, levels, nms_thresh, post_nms_top_n, valid=keep)
    idx = jnp.maximum(kept.indices, 0)
    return (jnp.where(kept.valid[:, None], boxes[idx], 0.0),
            jnp.where(kept.valid, probs[idx], 0.0), kept.valid)

  out = jax.vmap(one_image)(logits, boxes, levels, image_sizes)
  return Proposals(*out)


def smooth_l1(x: jax.Array, beta: float) -> jax.Array:
  """Elementwise smooth-L1 (Huber / beta), PyTorch's `smooth_l1_loss`; beta 0 is L1."""
  ax = jnp.abs(x)
  if beta <= 0:
    return ax
  return jnp.where(ax < beta, 0.5 * x * x / beta, ax - 0.5 * beta)


def rpn_loss_terms(objectness: jax.Array, deltas: jax.Array, anchors: jax.Array,
                   gt_boxes: jax.Array, gt_valid: jax.Array, keys: jax.Array,
                   config: RPNConfig, *, box_loss: str = 'smooth_l1'
                   ) -> dict[str, tuple[jax.Array, jax.Array]]:
  """RPN losses of a batch as (sum, count) pairs.

  Args:
    objectness: [B, A] logits; deltas: [B, A, 4] (with gradient).
    anchors: [A, 4]; gt_boxes: [B, M, 4]; gt_valid: [B, M] bool.
    keys: [B] PRNG keys for the per-image anchor sampling.
    box_loss: 'smooth_l1' (beta 1/9) or 'l1'.
  Returns:
    {'loss_objectness': (sum of BCE over sampled, #sampled),
     'loss_rpn_box_reg': (sum of box loss over positives, #sampled)}.
  """
  matcher = matching.Matcher(config.fg_iou_thresh, config.bg_iou_thresh,
                             allow_low_quality_matches=True)
  beta = SMOOTH_L1_BETA if box_loss == 'smooth_l1' else 0.0

  def one_image(obj, dl, boxes, valid, key):
    targets = matching.assign_anchor_targets(anchors, boxes, valid, matcher)
    sample = matching.sample_balanced(key, targets.labels.astype(jnp.int32),
                                      config.batch_size_per_image, config.positive_fraction)
    idx = jnp.maximum(sample.indices, 0)
    logits = obj[idx]
    labels = sample.positive.astype(jnp.float32)
    bce = optax.sigmoid_binary_cross_entropy(logits, labels)
    cls_sum = jnp.sum(jnp.where(sample.valid, bce, 0.0))
    reg_targets = matching.encode_regression_targets(
        RPN_BOX_CODER, targets.matched_gt_boxes[idx], anchors[idx], sample.positive)
    reg = jnp.sum(smooth_l1(dl[idx] - reg_targets, beta), -1)
    reg_sum = jnp.sum(jnp.where(sample.positive, reg, 0.0))
    count = jnp.sum(sample.valid, dtype=jnp.float32)
    return cls_sum, reg_sum, count

  cls_sum, reg_sum, count = jax.vmap(one_image)(objectness, deltas, gt_boxes, gt_valid, keys)
  count = jnp.sum(count)
  return {'loss_objectness': (jnp.sum(cls_sum), count),
          'loss_rpn_box_reg': (jnp.sum(reg_sum), count)}


class RegionProposalNetwork(nn.Module):
  """Holds the `head` (torchvision's `rpn.head`); proposals and losses are the functions above."""
  num_anchors: int
  dtype: Any = jnp.float32

  def setup(self):
    self.head = RPNHead(self.num_anchors, dtype=self.dtype)

  def __call__(self, features: Sequence[jax.Array]) -> tuple[jax.Array, jax.Array]:
    return self.head(features)
