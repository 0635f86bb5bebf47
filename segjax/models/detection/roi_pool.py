"""RoIPool (Girshick, Fast R-CNN §2.1), numerically equal to `torchvision.ops.roi_pool`.

Boxes are snapped to the feature grid (`round(x * spatial_scale)`, half away
from zero), split into P x Q bins of `floor`/`ceil` integer extent, and each bin
takes the max of its pixels (0 for an empty bin). The gradient goes to the
first maximal pixel of each bin in row-major order, as torchvision's argmax.

Static shapes: a bin is read through a window of `max_bin_size` rows and
columns, masked to the bin's own extent. The default bound
`min(H, ceil((H + 1) / P) + 1)` (and likewise for W) covers every bin of a box
inside the feature map, so the result is exact for boxes clipped to the
image; the bins of larger boxes are truncated to the window.
Cost and memory are O(K * P * Q * window * C): this op exists for Fast R-CNN
parity, not speed; RoIAlign is the one to use.

Layout: features [B, H, W, C], boxes [B, R, 4] `(x1, y1, x2, y2)` image pixels,
output [B, R, P, Q, C]; boxes carry no gradient.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp

from segjax.models.detection import roi_align as roi_align_lib


def _round_half_away_from_zero(x: jax.Array) -> jax.Array:
  """C's `round`; `jnp.round` rounds halves to even."""
  truncated = jnp.trunc(x)
  is_half = jnp.abs(x - truncated) == 0.5
  return jnp.where(is_half, truncated + jnp.sign(x), jnp.round(x))


def _bin_windows(start, end, size, num_bins, window, dtype):
  """Per box and bin: window indices [K, P, window] (clamped), their mask, non-empty [K, P]."""
  length = jnp.maximum(end - start + 1, 1).astype(dtype)
  bin_size = roi_align_lib.ieee_divide(length, num_bins)
  bins = jnp.arange(num_bins, dtype=dtype)[None, :]
  lo = jnp.floor(bins * bin_size[:, None]).astype(jnp.int32) + start[:, None]
  hi = jnp.ceil((bins + 1) * bin_size[:, None]).astype(jnp.int32) + start[:, None]
  lo = jnp.clip(lo, 0, size)
  hi = jnp.clip(hi, 0, size)
  index = lo[..., None] + jnp.arange(window, dtype=jnp.int32)
  return jnp.minimum(index, size - 1), index < hi[..., None], hi > lo


@functools.partial(jax.jit, static_argnames=('output_size', 'spatial_scale', 'max_bin_size'))
def roi_pool(features: jax.Array, boxes: jax.Array, output_size: int | Sequence[int], *,
             spatial_scale: float = 1.0,
             max_bin_size: int | Sequence[int] | None = None) -> jax.Array:
  """Max-pools each box into P x Q bins.

  Args:
    features: [B, H, W, C].
    boxes: [B, R, 4] image pixels.
    output_size: P or (P, Q).
    spatial_scale: feature pixels per image pixel (static).
    max_bin_size: static bin window (int or (rows, cols)); None: the exact bound
      for boxes inside the map (module doc).

  Returns:
    [B, R, P, Q, C] in the features' dtype.
  """
  if features.ndim != 4:
    raise ValueError(f'roi_pool features must be NHWC [B, H, W, C], got shape {features.shape}')
  if boxes.ndim != 3 or boxes.shape[0] != features.shape[0] or boxes.shape[-1] != 4:
    raise ValueError(f'roi_pool: boxes must have shape [B={features.shape[0]}, R, 4], '
                     f'got {boxes.shape}')
  output_size = roi_align_lib._pair(output_size, 'output_size')
  spatial_scale = roi_align_lib.check_spatial_scale(spatial_scale)
  batch, height, width, channels = features.shape
  num_rois = boxes.shape[1]
  if max_bin_size is None:
    window = (min(height, math.ceil((height + 1) / output_size[0]) + 1),
              min(width, math.ceil((width + 1) / output_size[1]) + 1))
  else:
    window = roi_align_lib._pair(max_bin_size, 'max_bin_size')

  dtype = jnp.promote_types(features.dtype, jnp.float32)
  flat_boxes = jax.lax.stop_gradient(boxes.reshape(-1, 4).astype(dtype))
  snapped = _round_half_away_from_zero(flat_boxes * spatial_scale).astype(jnp.int32)
  rows, row_ok, rows_nonempty = _bin_windows(snapped[:, 1], snapped[:, 3], height,
                                             output_size[0], window[0], dtype)
  cols, col_ok, cols_nonempty = _bin_windows(snapped[:, 0], snapped[:, 2], width,
                                             output_size[1], window[1], dtype)
  image = jnp.repeat(jnp.arange(batch, dtype=jnp.int32), num_rois)
  # [K, P, Q, window_h, window_w] pixel indices, row-major inside a window.
  index = (image[:, None, None, None, None] * (height * width)
           + rows[:, :, None, :, None] * width + cols[:, None, :, None, :])
  mask = row_ok[:, :, None, :, None] & col_ok[:, None, :, None, :]
  num_boxes = index.shape[0]
  index = index.reshape(num_boxes, *output_size, -1)
  mask = mask.reshape(num_boxes, *output_size, -1, 1)
  values = features.reshape(-1, channels)[index]  # [K, P, Q, window, C]
  masked = jnp.where(mask, values, -jnp.inf)
  # Gather at the argmax (first maximum) so the gradient reaches one pixel per bin.
  best = jnp.argmax(masked, axis=3, keepdims=True)
  pooled = jnp.take_along_axis(values, best, axis=3)[:, :, :, 0]
  nonempty = rows_nonempty[:, :, None] & cols_nonempty[:, None, :]
  pooled = jnp.where(nonempty[..., None], pooled, jnp.zeros((), pooled.dtype))
  return pooled.reshape(batch, num_rois, *output_size, channels)
