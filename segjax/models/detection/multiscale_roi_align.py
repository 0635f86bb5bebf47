"""RoIAlign over FPN levels, as torchvision's `MultiScaleRoIAlign` (FPN, Lin et al. 2017 §4.2).

Each box is pooled from one level, chosen by Eqn. (1) of the FPN paper:

    k = floor(k0 + log2(sqrt(w * h) / 224) + eps),  clamped to [k_min, k_max],

with k0 = 4 (`canonical_level`), 224 the ImageNet pre-training size
(`canonical_scale`) and eps = 1e-6, torchvision's `LevelMapper`. A level's
scale is inferred from its shape as `2 ** round(log2(h_feature / h_image))`
(torchvision's `_infer_scale`), so the feature maps must be consecutive FPN
levels, finest first (P2..P5 for Mask R-CNN).

Static shapes: every box is assigned a level by a mask, never by filtering.
'gather' flattens all levels into one array and reads each box from its own
level only (cost of one RoIAlign); 'matmul' pools every box from every level
and keeps its level's result (cost dominated by the finest level, ~4/3 of one
RoIAlign on it).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from segjax.models.detection import roi_align as roi_align_lib
from segjax.models.detection.boxes import box_area

CANONICAL_SCALE = 224
CANONICAL_LEVEL = 4
LEVEL_EPS = 1e-6


def infer_scale(feature_hw: Sequence[int], image_hw: Sequence[int]) -> float:
  """Feature pixels per image pixel, rounded to a power of 2 (from the heights)."""
  approx = np.float32(float(feature_hw[0]) / float(image_hw[0]))
  return float(2.0 ** float(np.round(np.log2(approx))))


def map_levels(boxes: jax.Array, k_min: int, k_max: int, *,
               canonical_scale: float = CANONICAL_SCALE,
               canonical_level: int = CANONICAL_LEVEL, eps: float = LEVEL_EPS) -> jax.Array:
  """FPN level index (0 for level `k_min`) of each box [..., 4] -> [...] int32."""
  dtype = jnp.promote_types(boxes.dtype, jnp.float32)
  sizes = jnp.sqrt(box_area(boxes.astype(dtype)))
  levels = jnp.floor(canonical_level + jnp.log2(sizes / canonical_scale) + jnp.asarray(eps, dtype))
  return (jnp.clip(levels, k_min, k_max) - k_min).astype(jnp.int32)


def level_range(feature_shapes: Sequence[Sequence[int]], image_hw: Sequence[int]
                ) -> tuple[list[float], int, int]:
  """(scales, k_min, k_max) of consecutive levels with `(h, w)` shapes."""
  scales = [infer_scale(hw, image_hw) for hw in feature_shapes]
  k_min = int(-math.log2(scales[0]))
  k_max = int(-math.log2(scales[-1]))
  if k_max - k_min + 1 != len(scales) or any(
      s != 2.0 ** -(k_min + i) for i, s in enumerate(scales)):
    raise ValueError(f'feature maps of shapes {list(feature_shapes)} for image {tuple(image_hw)} '
                     f'have scales {scales}; expected consecutive FPN levels, finest first '
                     '(each half the size of the previous one)')
  return scales, k_min, k_max


@functools.partial(jax.jit, static_argnames=(
    'image_shape', 'output_size', 'sampling_ratio', 'canonical_scale', 'canonical_level',
    'aligned', 'impl', 'max_sampling_ratio', 'precision'))
def multiscale_roi_align(features: Sequence[jax.Array], boxes: jax.Array,
                         image_shape: tuple[int, int], output_size: int | Sequence[int], *,
                         sampling_ratio: int, canonical_scale: float = CANONICAL_SCALE,
                         canonical_level: int = CANONICAL_LEVEL, aligned: bool = False,
                         impl: str = 'auto',
                         max_sampling_ratio: int | Sequence[int] | None = None,
                         precision: jax.lax.PrecisionLike = jax.lax.Precision.HIGHEST
                         ) -> jax.Array:
  """RoIAlign of each box on its FPN level.

  Args:
    features: per level [B, H_l, W_l, C], consecutive levels, finest first.
    boxes: [B, R, 4] image pixels (no gradient).
    image_shape: static `(H, W)` the scales are inferred from: torchvision uses
      the largest unpadded image size of the batch; the padded batch size gives
      the same powers of 2 whenever padding is less than a third of the size.
    output_size: P or (P, Q).
    sampling_ratio: samples per bin side (torchvision's Mask R-CNN uses 2), or
      0 / -1 adaptive (bounded as in `roi_align`, by the finest level's size).
    canonical_scale, canonical_level: FPN Eqn. (1); torchvision's defaults.
    aligned: as `roi_align` (torchvision's `MultiScaleRoIAlign` uses False).
    impl, max_sampling_ratio, precision: as `roi_align`.

  Returns:
    [B, R, P, Q, C].
  """
  features = list(features)
  if not features:
    raise ValueError('multiscale_roi_align needs at least one feature map')
  for f in features:
    if f.ndim != 4 or f.shape[0] != features[0].shape[0] or f.shape[3] != features[0].shape[3]:
      raise ValueError('multiscale_roi_align: features must be [B, H_l, W_l, C] with the same '
                       f'B and C, got shapes {[f.shape for f in features]}')
  if boxes.ndim != 3 or boxes.shape[0] != features[0].shape[0] or boxes.shape[-1] != 4:
    raise ValueError(f'multiscale_roi_align: boxes must have shape [B={features[0].shape[0]}, '
                     f'R, 4], got {boxes.shape}')
  shapes = [tuple(f.shape[1:3]) for f in features]
  scales, k_min, k_max = level_range(shapes, image_shape)
  kwargs = dict(sampling_ratio=sampling_ratio, aligned=aligned, impl=impl,
                max_sampling_ratio=max_sampling_ratio, precision=precision)
  if len(features) == 1:
    return roi_align_lib.roi_align(features[0], boxes, output_size, spatial_scale=scales[0],
                                   **kwargs)

  output_size = roi_align_lib._pair(output_size, 'output_size')
  sampling_ratio = roi_align_lib.check_sampling_ratio(sampling_ratio)
  samples = roi_align_lib.samples_per_side(sampling_ratio, output_size, shapes[0],
                                           max_sampling_ratio)
  impl = roi_align_lib.resolve_impl(impl, samples, output_size, shapes)
  batch, num_rois = boxes.shape[:2]
  channels = features[0].shape[3]
  flat_boxes = boxes.reshape(-1, 4)
  levels = map_levels(jax.lax.stop_gradient(flat_boxes), k_min, k_max,
                      canonical_scale=canonical_scale, canonical_level=canonical_level)

  if impl == 'gather':
    heights = jnp.asarray([h for h, _ in shapes], jnp.int32)
    widths = jnp.asarray([w for _, w in shapes], jnp.int32)
    sizes = [batch * h * w for h, w in shapes]
    level_base = jnp.asarray(np.cumsum([0] + sizes[:-1]), jnp.int32)
    image = jnp.repeat(jnp.arange(batch, dtype=jnp.int32), num_rois)
    height, width = heights[levels], widths[levels]
    base = level_base[levels] + image * height * width
    dtype = roi_align_lib.coordinate_dtype(features[0].dtype)
    scale = jnp.asarray(scales, dtype)[levels]
    x1, y1, x2, y2 = roi_align_lib.scaled_box_extents(flat_boxes, scale[:, None], aligned, dtype)
    ys = roi_align_lib.axis_samples(y1, y2, height, output_size[0], sampling_ratio,
                                    samples[0], aligned)
    xs = roi_align_lib.axis_samples(x1, x2, width, output_size[1], sampling_ratio,
                                    samples[1], aligned)
    flat = jnp.concatenate([f.reshape(-1, channels) for f in features], axis=0)
    out = roi_align_lib.gather_pool(flat, base, width, ys, xs)
    return out.reshape(batch, num_rois, *output_size, channels)

  def pool(f, scale):
    level_samples = roi_align_lib.samples_per_side(sampling_ratio, output_size, f.shape[1:3],
                                                   max_sampling_ratio)
    return roi_align_lib.roi_align(f, boxes, output_size, spatial_scale=scale,
                                   sampling_ratio=sampling_ratio, aligned=aligned,
                                   impl='matmul', max_sampling_ratio=level_samples,
                                   precision=precision)
  return _each_box_from_its_level(pool, features, scales, levels.reshape(batch, num_rois))


def _each_box_from_its_level(pool, features, scales, levels: jax.Array) -> jax.Array:
  """Pools every box on every level with `pool(feature, scale)` -> [B, R, P, Q, C] and
  keeps, per box, its own level's result (`levels` [B, R]): static shapes, no filtering."""
  out = None
  for level, (f, scale) in enumerate(zip(features, scales)):
    pooled = pool(f, scale)
    pooled = jnp.where((levels == level)[..., None, None, None], pooled,
                       jnp.zeros((), pooled.dtype))
    out = pooled if out is None else out + pooled
  return out


@functools.partial(jax.jit, static_argnames=(
    'image_shape', 'output_size', 'canonical_scale', 'canonical_level'))
def multiscale_roi_pool(features: Sequence[jax.Array], boxes: jax.Array,
                        image_shape: tuple[int, int], output_size: int | Sequence[int], *,
                        canonical_scale: float = CANONICAL_SCALE,
                        canonical_level: int = CANONICAL_LEVEL) -> jax.Array:
  """RoIPool (Fast R-CNN's quantised max pooling, `roi_pool`) of each box on its FPN level.

  Levels are chosen exactly as in `multiscale_roi_align`; every box is pooled on every
  level and its own level's result kept (static shapes). This is the RoIPool arm of
  the Mask R-CNN paper's Table 2c ablation, not a fast path.

  Args:
    features: per level [B, H_l, W_l, C], consecutive levels, finest first.
    boxes: [B, R, 4] image pixels (no gradient).
    image_shape, output_size, canonical_scale, canonical_level: as `multiscale_roi_align`.

  Returns:
    [B, R, P, Q, C].
  """
  from segjax.models.detection import roi_pool as roi_pool_lib  # pylint: disable=g-import-not-at-top

  features = list(features)
  if not features:
    raise ValueError('multiscale_roi_pool needs at least one feature map')
  if boxes.ndim != 3 or boxes.shape[0] != features[0].shape[0] or boxes.shape[-1] != 4:
    raise ValueError(f'multiscale_roi_pool: boxes must have shape [B={features[0].shape[0]}, '
                     f'R, 4], got {boxes.shape}')
  shapes = [tuple(f.shape[1:3]) for f in features]
  scales, k_min, k_max = level_range(shapes, image_shape)
  batch, num_rois = boxes.shape[:2]
  levels = map_levels(jax.lax.stop_gradient(boxes.reshape(-1, 4)), k_min, k_max,
                      canonical_scale=canonical_scale, canonical_level=canonical_level)
  return _each_box_from_its_level(
      lambda f, scale: roi_pool_lib.roi_pool(f, boxes, output_size, spatial_scale=scale),
      features, scales, levels.reshape(batch, num_rois))
