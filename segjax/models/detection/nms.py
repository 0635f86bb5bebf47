"""Greedy non-maximum suppression with a static number of outputs.

`nms` returns the same kept boxes, in the same order, as `torchvision.ops.nms`,
padded to `max_output_size` with a validity mask so it can run under `jax.jit`
and `jax.vmap` (one call per image of a batch):

    keep = jax.vmap(lambda b, s, v: nms(b, s, 0.7, 1000, valid=v))(boxes, scores, valid)

Algorithm. Boxes are sorted by score (descending). Each step keeps the
highest-scoring box that is still alive and kills every alive box whose IoU with
it is > `iou_threshold` (strictly greater, as torchvision). The loop stops when
`max_output_size` boxes are kept or none is alive, so it runs at most
`max_output_size` steps of O(N) work and needs O(N) memory: no N x N IoU
matrix is built, which matters for RPN proposals (thousands of boxes per image).
The overlap is computed with torchvision's own arithmetic
(`inter / (area_i + area_j - inter)` in the boxes' dtype), so decisions at the
threshold agree bit for bit with its CPU kernel.

Ties in score. Equal scores are ordered by index (lower index first: a stable
sort). torchvision 0.29's CPU kernel does the same (tested on tied scores in
tests/test_detection_nms.py), although `torch.sort(descending=True)` called from
Python is not stable; on other backends or versions torchvision's order among
tied scores is an implementation detail, and this module keeps the stable rule.

Class-aware NMS (`batched_nms`) suppresses only between boxes with the same
class index. torchvision gets this with the coordinate-offset trick (shift each
class's boxes by `class * (max_coordinate + 1)` and run plain NMS); here the
IoU row is multiplied by a same-class mask instead, which gives exactly the
result of running NMS per class (torchvision's `_batched_nms_vanilla`) with no
loss of float precision from large offsets. The two agree except when the
offsets' rounding moves an IoU across the threshold.
"""

from __future__ import annotations

import functools
import numbers
from typing import NamedTuple

import jax
import jax.numpy as jnp

from segjax.models.detection.boxes import box_area


class NmsOutput(NamedTuple):
  """Kept boxes of one NMS call, a fixed number of slots.

  Attributes:
    indices: [max_output_size] int32 indices into the input boxes, in decreasing
      score order; padding slots hold -1.
    valid: [max_output_size] bool, True for the first `num_kept` slots.
  """
  indices: jax.Array
  valid: jax.Array

  @property
  def num_kept(self) -> jax.Array:
    return jnp.sum(self.valid, axis=-1, dtype=jnp.int32)


def _check_inputs(boxes, scores, max_output_size):
  if boxes.ndim != 2 or boxes.shape[-1] != 4:
    raise ValueError(f'nms: boxes must have shape [N, 4], got {boxes.shape}')
  if scores.shape != boxes.shape[:1]:
    raise ValueError(f'nms: scores must have shape [{boxes.shape[0]}], got {scores.shape}')
  if (isinstance(max_output_size, bool) or not isinstance(max_output_size, numbers.Integral)
      or max_output_size < 1):
    raise ValueError(f'nms: max_output_size={max_output_size!r} must be an integer >= 1')


def _greedy_nms(boxes, scores, iou_threshold, max_output_size, valid, groups):
  num_boxes = boxes.shape[0]
  if num_boxes == 0:
    return NmsOutput(jnp.full((max_output_size,), -1, jnp.int32),
                     jnp.zeros((max_output_size,), bool))
  order = jnp.argsort(scores, descending=True, stable=True).astype(jnp.int32)
  boxes = boxes[order]
  x1, y1, x2, y2 = boxes[:, 0], boxes[:, 1], boxes[:, 2], boxes[:, 3]
  areas = box_area(boxes)
  alive = jnp.ones((num_boxes,), bool) if valid is None else valid[order]
  groups = None if groups is None else groups[order]

  def cond(state):
    alive, _, count = state
    return (count < max_output_size) & jnp.any(alive)

  def body(state):
    alive, kept, count = state
    i = jnp.argmax(alive)  # the first alive box in score order
    w = jnp.maximum(jnp.minimum(x2[i], x2) - jnp.maximum(x1[i], x1), 0)
    h = jnp.maximum(jnp.minimum(y2[i], y2) - jnp.maximum(y1[i], y1), 0)
    inter = w * h
    overlap = inter / (areas[i] + areas - inter)  # 0/0 = NaN never suppresses
    suppress = overlap > iou_threshold
    if groups is not None:
      suppress &= groups == groups[i]
    alive = alive & ~suppress
    alive = alive.at[i].set(False)
    kept = kept.at[count].set(i.astype(jnp.int32))
    return alive, kept, count + 1

  kept = jnp.full((max_output_size,), -1, jnp.int32)
  _, kept, count = jax.lax.while_loop(cond, body, (alive, kept, jnp.int32(0)))
  is_valid = jnp.arange(max_output_size) < count
  indices = jnp.where(is_valid, order[jnp.maximum(kept, 0)], -1)
  return NmsOutput(indices, is_valid)


@functools.partial(jax.jit, static_argnames=('max_output_size',))
def nms(boxes: jax.Array, scores: jax.Array, iou_threshold: float | jax.Array,
        max_output_size: int, *, valid: jax.Array | None = None) -> NmsOutput:
  """Greedy NMS, torchvision's result in a fixed number of slots.

  Args:
    boxes: [N, 4] `(x1, y1, x2, y2)`.
    scores: [N].
    iou_threshold: boxes overlapping a kept box with IoU > this are discarded.
    max_output_size: static number of output slots; at most this many boxes
      are kept (the highest-scoring ones, as torchvision's `keep[:k]`).
    valid: optional [N] bool; invalid (padding) boxes are never kept and never
      suppress anything.

  Returns:
    `NmsOutput(indices, valid)`.
  """
  _check_inputs(boxes, scores, max_output_size)
  return _greedy_nms(boxes, scores, iou_threshold, max_output_size, valid, None)


@functools.partial(jax.jit, static_argnames=('max_output_size',))
def batched_nms(boxes: jax.Array, scores: jax.Array, idxs: jax.Array,
                iou_threshold: float | jax.Array, max_output_size: int, *,
                valid: jax.Array | None = None) -> NmsOutput:
  """Class-aware NMS: boxes suppress only boxes with the same `idxs` value.

  Same result as `torchvision.ops.batched_nms` (see the module docstring for
  how it differs from the coordinate-offset trick). Kept boxes of all classes
  come out together, in decreasing score order.

  Args:
    boxes: [N, 4].
    scores: [N].
    idxs: [N] int class (or FPN level) of each box.
    iou_threshold, max_output_size, valid: as in `nms`.
  """
  _check_inputs(boxes, scores, max_output_size)
  if idxs.shape != scores.shape:
    raise ValueError(f'batched_nms: idxs must have shape {scores.shape}, got {idxs.shape}')
  return _greedy_nms(boxes, scores, iou_threshold, max_output_size, valid, idxs)
