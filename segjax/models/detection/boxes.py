"""Box geometry and the R-CNN box coder.

Coordinate convention (used by every module in `segjax.models.detection`):
boxes are `(x1, y1, x2, y2)` in continuous pixel coordinates of the (resized,
unpadded) input image, as torchvision's detection models use them: x is the
column, y the row, `x2 - x1` the width (no "+1"), and a box is non-degenerate
when `x1 < x2` and `y1 < y2`. Arrays of boxes have a trailing axis of size 4,
e.g. `[N, 4]` or `[B, N, 4]`.

Everything here is a pure, shape-static function: filters that torchvision
implements by returning indices (`remove_small_boxes`) return boolean masks
instead, so they can run under `jax.jit`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp

# Largest log-scale the box coder will exponentiate: a box may grow at most
# 1000/16 times per side (torchvision / Detectron's `bbox_xform_clip`).
BBOX_XFORM_CLIP = math.log(1000.0 / 16)


def box_area(boxes: jax.Array) -> jax.Array:
  """Areas of boxes [..., 4] -> [...]; `(x2 - x1) * (y2 - y1)`, unclamped as torchvision."""
  return (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])


def _safe_divide(num: jax.Array, den: jax.Array) -> jax.Array:
  """num / den where den > 0, else 0; no NaN in the value or the gradient."""
  positive = den > 0
  return jnp.where(positive, num / jnp.where(positive, den, 1), 0)


def box_iou(boxes1: jax.Array, boxes2: jax.Array) -> jax.Array:
  """Intersection over union of every pair: [N, 4] x [M, 4] -> [N, M].

  Equals `torchvision.ops.box_iou` except for pairs whose union is 0 (two
  empty boxes), which get IoU 0 here instead of NaN: padded boxes (all zeros)
  then neither match nor suppress anything.
  """
  area1 = box_area(boxes1)
  area2 = box_area(boxes2)
  lt = jnp.maximum(boxes1[:, None, :2], boxes2[None, :, :2])
  rb = jnp.minimum(boxes1[:, None, 2:], boxes2[None, :, 2:])
  wh = jnp.maximum(rb - lt, 0)
  inter = wh[..., 0] * wh[..., 1]
  union = area1[:, None] + area2[None, :] - inter
  return _safe_divide(inter, union)


def clip_boxes_to_image(boxes: jax.Array, image_size: Sequence[int] | jax.Array) -> jax.Array:
  """Clamps x to [0, width] and y to [0, height], as `torchvision.ops.clip_boxes_to_image`.

  Args:
    boxes: [..., 4].
    image_size: `(height, width)`, Python ints or a traced [2] array (e.g. the
      per-image unpadded size inside a padded batch).
  """
  height, width = image_size[0], image_size[1]
  x = jnp.clip(boxes[..., 0::2], 0, width)
  y = jnp.clip(boxes[..., 1::2], 0, height)
  return jnp.stack([x[..., 0], y[..., 0], x[..., 1], y[..., 1]], axis=-1)


def remove_small_boxes(boxes: jax.Array, min_size: float) -> jax.Array:
  """Keep-mask of boxes whose width and height are both >= `min_size`.

  torchvision's `remove_small_boxes` returns the indices `nonzero(keep)`; under
  static shapes the mask itself is returned and callers fold it into their
  validity mask.

  Args:
    boxes: [..., 4].
    min_size: minimum width and height in pixels.

  Returns:
    [...] bool, True for boxes to keep.
  """
  widths = boxes[..., 2] - boxes[..., 0]
  heights = boxes[..., 3] - boxes[..., 1]
  return (widths >= min_size) & (heights >= min_size)


@dataclasses.dataclass(frozen=True)
class BoxCoder:
  """Faster R-CNN box parameterisation (Girshick et al., R-CNN appendix C).

  A box is encoded relative to a reference box (anchor or proposal) of width w,
  height h and centre (cx, cy) as

      (wx * (gx - cx) / w,  wy * (gy - cy) / h,  ww * log(gw / w),  wh * log(gh / h)).

  torchvision uses weights (1, 1, 1, 1) in the RPN and (10, 10, 5, 5) in the
  RoI box head. The coder is a frozen dataclass, so it can be a static argument
  or a field of a flax Module.

  Attributes:
    weights: `(wx, wy, ww, wh)`.
    bbox_xform_clip: largest `dw`/`dh` (after dividing by the weight) that
      `decode` exponentiates.
  """
  weights: tuple[float, float, float, float] = (1.0, 1.0, 1.0, 1.0)
  bbox_xform_clip: float = BBOX_XFORM_CLIP

  def __post_init__(self):
    if len(self.weights) != 4 or any(not w > 0 for w in self.weights):
      raise ValueError(f'BoxCoder weights={self.weights!r} must be 4 positive numbers '
                       '(wx, wy, ww, wh)')

  def encode(self, matched_gt_boxes: jax.Array, proposals: jax.Array) -> jax.Array:
    """Regression targets of `matched_gt_boxes` w.r.t. `proposals`.

    Same argument order as torchvision's `BoxCoder.encode_single(reference_boxes,
    proposals)`.

    Args:
      matched_gt_boxes: [..., 4], broadcastable against `proposals`.
      proposals: [..., 4] reference boxes (anchors or proposals), non-degenerate.

    Returns:
      [..., 4] deltas `(dx, dy, dw, dh)`.
    """
    wx, wy, ww, wh = self.weights
    ex_widths = proposals[..., 2] - proposals[..., 0]
    ex_heights = proposals[..., 3] - proposals[..., 1]
    ex_ctr_x = proposals[..., 0] + 0.5 * ex_widths
    ex_ctr_y = proposals[..., 1] + 0.5 * ex_heights
    gt_widths = matched_gt_boxes[..., 2] - matched_gt_boxes[..., 0]
    gt_heights = matched_gt_boxes[..., 3] - matched_gt_boxes[..., 1]
    gt_ctr_x = matched_gt_boxes[..., 0] + 0.5 * gt_widths
    gt_ctr_y = matched_gt_boxes[..., 1] + 0.5 * gt_heights
    dx = wx * (gt_ctr_x - ex_ctr_x) / ex_widths
    dy = wy * (gt_ctr_y - ex_ctr_y) / ex_heights
    dw = ww * jnp.log(gt_widths / ex_widths)
    dh = wh * jnp.log(gt_heights / ex_heights)
    return jnp.stack([dx, dy, dw, dh], axis=-1)

  def decode(self, deltas: jax.Array, boxes: jax.Array) -> jax.Array:
    """Applies `deltas` to reference `boxes`; the inverse of `encode`.

    Class-specific deltas decode by broadcasting: deltas [N, K, 4] with boxes
    [N, 1, 4] gives [N, K, 4] (torchvision's `[N, K*4]` layout reshaped).

    Args:
      deltas: [..., 4] `(dx, dy, dw, dh)`.
      boxes: [..., 4] reference boxes, broadcastable against `deltas`.

    Returns:
      [..., 4] decoded boxes (not clipped to the image).
    """
    wx, wy, ww, wh = self.weights
    boxes = boxes.astype(deltas.dtype)
    widths = boxes[..., 2] - boxes[..., 0]
    heights = boxes[..., 3] - boxes[..., 1]
    ctr_x = boxes[..., 0] + 0.5 * widths
    ctr_y = boxes[..., 1] + 0.5 * heights
    dx = deltas[..., 0] / wx
    dy = deltas[..., 1] / wy
    dw = jnp.minimum(deltas[..., 2] / ww, self.bbox_xform_clip)
    dh = jnp.minimum(deltas[..., 3] / wh, self.bbox_xform_clip)
    pred_ctr_x = dx * widths + ctr_x
    pred_ctr_y = dy * heights + ctr_y
    half_w = 0.5 * (jnp.exp(dw) * widths)
    half_h = 0.5 * (jnp.exp(dh) * heights)
    return jnp.stack([pred_ctr_x - half_w, pred_ctr_y - half_h,
                      pred_ctr_x + half_w, pred_ctr_y + half_h], axis=-1)
