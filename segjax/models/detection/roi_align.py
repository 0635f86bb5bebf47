"""RoIAlign (He et al., Mask R-CNN §3), numerically equal to `torchvision.ops.roi_align`.

Layout. Features are NHWC `[B, H, W, C]` (torchvision: NCHW). Boxes are
`(x1, y1, x2, y2)` in image pixels (see `boxes.py`); `spatial_scale` maps them
to feature pixels (1/4 for a stride-4 map). Two box layouts:

- `roi_align(features [B, H, W, C], boxes [B, R, 4])`: a fixed number R of
  boxes per image, as the Mask R-CNN heads use. Output `[B, R, P, Q, C]`.
- `roi_align_indexed(features [N, H, W, C], boxes [K, 4], box_indices [K])`:
  torchvision's layout, each box naming its map. Output `[K, P, Q, C]`.

Semantics (torchvision's, which it took from Detectron). A box's bin (p, q)
averages `gh * gw` bilinear samples taken at the centres of a regular grid
inside the bin. `aligned=True` shifts the box by -0.5 pixel so that sample
positions are pixel centres (Detectron2's fix); `aligned=False` is the original
Mask R-CNN op and forces boxes to be at least 1x1. The sampling grid is
`sampling_ratio` per side when > 0, otherwise adaptive:
`ceil(box_size / output_size)` per side, a number that depends on the box.

Static shapes with adaptive sampling. Under `jit` the number of samples per
bin must be fixed, so adaptive sampling evaluates `max_sampling_ratio` sample
slots per side and masks the ones beyond the box's own `ceil(...)`. The default
bound is `ceil(H / P)` x `ceil(W / Q)`, which is exact for every box lying
inside the feature map (boxes clipped to the image): the result then equals
torchvision's. A larger box is sampled with the grid clamped to the bound
(and averaged over the samples taken). A smaller explicit bound trades that
exactness on large boxes for speed.

Two implementations, chosen with `impl=`:

- 'gather': reads the 4 neighbours of every sample point (`[K, P, 2S, Q, 2S]`
  feature rows per box, S samples per side). Cost grows with S**2: cheapest
  for a small fixed `sampling_ratio`. Its gradient is a scatter-add. On CPU both
  go a few boxes at a time, so that a chunk's neighbours stay in cache.
- 'matmul': bilinear sampling is separable, so the whole op is
  `out[k] = Ay[k] @ F @ Ax[k].T` per channel, with interpolation matrices
  `Ay [K, P, H]` and `Ax [K, Q, W]` that already average the samples of each
  bin. Two dense contractions, cost O(K * P * H * W * C) independent of S, and
  a gradient made of matmuls too. The natural choice for TPUs (matrix units,
  slow gathers and scatters), and for adaptive sampling with a large bound.
- 'auto': 'matmul' on TPU (by design, not measured here); on CPU and GPU the
  choice measured in experiments/roi_align/results.md (see `_AUTO_GATHER_MAX_TAPS`);
  on CPU the two costs are weighed (`_CPU_GATHER_READ_COST`): 'gather' for a fixed
  2x2 to 4x4 samples on a 64x64 or larger map, and on FPN levels, where 'matmul'
  pools every box on every level; 'matmul' for small maps and adaptive sampling
  with its large bound.

Gradients flow to the features only: boxes are wrapped in `stop_gradient`, as
torchvision's op has no box gradient.
"""

from __future__ import annotations

import functools
import math
import numbers
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp

IMPLS = ('auto', 'gather', 'matmul')

# 'auto' picks 'gather' while a bin has at most this many samples (gh * gw); above it
# the costs decide (next constant) where the map sizes are known, else 'matmul'.
# GPU: not measured here (no GPU was available); gathers are cheap there, so 'gather'
# up to 4x4.
_AUTO_GATHER_MAX_TAPS = {'cpu': 1, 'gpu': 16}

# 'auto' on CPU above that many samples: one 'gather' neighbour read costs about as much
# as this many 'matmul' multiply-adds. 'matmul' does P*H*W + P*Q*W of them per box and
# channel (summed over the maps it reads), 'gather' reads P*Q*gh*gw*4 neighbours.
# Measured with the chunked 'gather' (experiments/roi_align/results.md, 2026-12-06): 512
# boxes, 7x7 bins on a 64x64 map, fwd+bwd: 2x2 samples (cost ratio 41) 'gather' 4.3x
# faster, 3x3 (18) 1.7x, 4x4 (10) 1.1x, adaptive 10x10 (1.6) 'matmul' 6x faster. (Before
# the chunks it was 64: 'matmul' won on a 64x64 map.)
_CPU_GATHER_READ_COST = 8

# Boxes per step of the CPU 'matmul' loop (measured in experiments/roi_align).
_MATMUL_CHUNK = 16

# Neighbour values per step of the CPU 'gather' loop: 8 boxes of 7x7 bins, 2x2 samples
# (16 neighbours each), 256 channels; 6.4 MB in float32 (measured in experiments/roi_align:
# 4 to 16 such boxes per step ran alike, 32 1.5x slower, all 512 at once 4-10x).
_GATHER_CHUNK_VALUES = 8 * 49 * 16 * 256


def _pair(value, name: str) -> tuple[int, int]:
  if isinstance(value, numbers.Integral) and not isinstance(value, bool):
    value = (value, value)
  if (not isinstance(value, Sequence) or len(value) != 2
      or any(isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 1
             for v in value)):
    raise ValueError(f'{name}={value!r} must be a positive integer or a pair of them')
  return int(value[0]), int(value[1])


def check_sampling_ratio(sampling_ratio) -> int:
  """Validates torchvision's `sampling_ratio`: a positive int, or 0 / -1 for adaptive."""
  if (isinstance(sampling_ratio, bool) or not isinstance(sampling_ratio, numbers.Integral)
      or sampling_ratio < -1):
    raise ValueError(f'sampling_ratio={sampling_ratio!r} must be a positive integer '
                     '(samples per bin side) or 0 / -1 (adaptive: ceil(box size / output size))')
  return int(sampling_ratio)


def check_impl(impl) -> str:
  if impl not in IMPLS:
    raise ValueError(f'impl={impl!r} is not valid; choose one of {list(IMPLS)}')
  return impl


def check_spatial_scale(spatial_scale) -> float:
  if (isinstance(spatial_scale, bool) or not isinstance(spatial_scale, numbers.Real)
      or not spatial_scale > 0):
    raise ValueError(f'spatial_scale={spatial_scale!r} must be a number > 0')
  return float(spatial_scale)


def samples_per_side(sampling_ratio: int, output_size: tuple[int, int],
                     feature_hw: tuple[int, int],
                     max_sampling_ratio: int | Sequence[int] | None) -> tuple[int, int]:
  """Static sample slots per bin side: `sampling_ratio`, or the adaptive bound."""
  if sampling_ratio > 0:
    return sampling_ratio, sampling_ratio
  if max_sampling_ratio is not None:
    return _pair(max_sampling_ratio, 'max_sampling_ratio')
  return (max(1, math.ceil(feature_hw[0] / output_size[0])),
          max(1, math.ceil(feature_hw[1] / output_size[1])))


def resolve_impl(impl: str, samples: tuple[int, int], output_size: tuple[int, int] | None = None,
                 map_shapes: Sequence[tuple[int, int]] = ()) -> str:
  """'gather' or 'matmul' for `impl` ('auto' decided per backend and samples per bin).

  `output_size` and `map_shapes` (the (H, W) of every map 'matmul' would pool each box
  on: one, or all FPN levels) let 'auto' weigh the two costs on CPU; without them only
  the samples per bin decide.
  """
  impl = check_impl(impl)
  if impl != 'auto':
    return impl
  backend = jax.default_backend()
  if backend == 'tpu':
    return 'matmul'
  max_taps = _AUTO_GATHER_MAX_TAPS.get(backend, _AUTO_GATHER_MAX_TAPS['gpu'])
  if samples[0] * samples[1] <= max_taps:
    return 'gather'
  if (backend == 'cpu' and output_size is not None and map_shapes
      and matmul_to_gather_cost(samples, output_size, map_shapes) > _CPU_GATHER_READ_COST):
    return 'gather'
  return 'matmul'


def matmul_to_gather_cost(samples: tuple[int, int], output_size: tuple[int, int],
                          map_shapes: Sequence[tuple[int, int]]) -> float:
  """'matmul''s multiply-adds per box and channel (summed over `map_shapes`) over
  'gather''s neighbour reads: what CPU 'auto' compares with `_CPU_GATHER_READ_COST`."""
  rows, cols = output_size
  matmul_macs = sum(rows * h * w + rows * cols * w for h, w in map_shapes)
  return matmul_macs / (rows * cols * samples[0] * samples[1] * 4)


def ieee_divide(numerator: jax.Array, denominator) -> jax.Array:
  """`numerator / denominator` correctly rounded, as torchvision's C++ computes it.

  XLA rewrites a division by a broadcast value (a scalar, or [K, 1] against
  [K, P]) into a multiplication by its reciprocal, which can be 1 ulp off; that
  moves `ceil`/`floor` at exact multiples (`ceil(21 / 7)` becomes 4 in float32). A
  full-shape divisor behind an optimization barrier keeps a true division.
  """
  shape = jnp.broadcast_shapes(jnp.shape(numerator), jnp.shape(denominator))
  dtype = jnp.result_type(numerator, denominator)
  denominator = jax.lax.optimization_barrier(jnp.broadcast_to(
      jnp.asarray(denominator, dtype), shape))
  return jnp.broadcast_to(numerator, shape) / denominator


class AxisSamples(NamedTuple):
  """Bilinear taps along one axis: for box k, bin p, sample s, the two
  neighbouring pixel indices and their weights. Weights already include the
  bin average (1 / grid) and are 0 for masked or out-of-map samples.
  Each field is [K, P, S]."""
  low: jax.Array
  high: jax.Array
  w_low: jax.Array
  w_high: jax.Array


def axis_samples(start: jax.Array, end: jax.Array, size: int | jax.Array, num_bins: int,
                 sampling_ratio: int, num_samples: int, aligned: bool) -> AxisSamples:
  """Sample taps along one axis of K boxes.

  Args:
    start, end: [K] box extent in feature pixels, already scaled and, if
      `aligned`, shifted by -0.5.
    size: the feature map's extent along this axis (int, or [K] per box).
    num_bins: output bins along this axis.
    sampling_ratio: > 0 fixed, else adaptive.
    num_samples: static sample slots per bin (== sampling_ratio when fixed).
    aligned: torchvision's `aligned` (when False, boxes are at least 1 pixel).
  """
  length = end - start
  if not aligned:
    length = jnp.maximum(length, 1.0)
  bin_size = ieee_divide(length, num_bins)
  if sampling_ratio > 0:
    grid = jnp.full(start.shape, sampling_ratio, jnp.int32)
  else:
    grid = jnp.minimum(jnp.ceil(bin_size).astype(jnp.int32), num_samples)
  grid_f = grid.astype(start.dtype)[:, None, None]
  size = jnp.asarray(size)
  size_k = (size if size.ndim == 0 else size[:, None, None])
  size_f = size_k.astype(start.dtype)
  bins = jnp.arange(num_bins, dtype=start.dtype)[None, :, None]
  taps = jnp.arange(num_samples, dtype=start.dtype)[None, None, :]
  # torchvision's order of operations: start + p * bin + (s + .5) * bin / grid.
  coord = (start[:, None, None] + bins * bin_size[:, None, None]
           + ieee_divide((taps + 0.5) * bin_size[:, None, None], grid_f))
  inside = (coord >= -1.0) & (coord <= size_f)
  used = jnp.arange(num_samples)[None, None, :] < grid[:, None, None]
  coord = jnp.clip(coord, 0.0, size_f)
  low = jnp.floor(coord).astype(jnp.int32)
  at_edge = low >= size_k - 1
  low = jnp.where(at_edge, size_k - 1, low)
  high = jnp.where(at_edge, size_k - 1, low + 1)
  frac = jnp.where(at_edge, 0.0, coord - low.astype(coord.dtype))
  scale = jnp.where(inside & used, 1.0 / jnp.maximum(grid_f, 1.0), 0.0)
  return AxisSamples(low, high, (1.0 - frac) * scale, frac * scale)


def coordinate_dtype(features_dtype) -> jnp.dtype:
  """Sample positions and weights are computed in float32, or float64 for float64 maps."""
  return jnp.promote_types(features_dtype, jnp.float32)


def scaled_box_extents(boxes: jax.Array, spatial_scale, aligned: bool, dtype=jnp.float32):
  """(x1, y1, x2, y2) of boxes [K, 4] in feature pixels, each [K] of `dtype`."""
  boxes = jax.lax.stop_gradient(boxes.astype(dtype))
  offset = 0.5 if aligned else 0.0
  scaled = boxes * spatial_scale - offset
  return scaled[:, 0], scaled[:, 1], scaled[:, 2], scaled[:, 3]


def gather_pool(flat_features: jax.Array, base: jax.Array, row_stride: jax.Array | int,
                ys: AxisSamples, xs: AxisSamples) -> jax.Array:
  """'gather' RoIAlign: weighted sum of the 4 neighbours of every sample.

  Args:
    flat_features: [N, C], the maps flattened row-major (pixel (h, w) of a map
      at `base + h * row_stride + w`).
    base: [K] offset of each box's map in `flat_features`.
    row_stride: width of each box's map (int or [K]).
    ys: taps along y, fields [K, P, Sy]; xs: along x, [K, Q, Sx].

  Returns:
    [K, P, Q, C] in the features' dtype. On CPU the boxes go in chunks of
    `_GATHER_CHUNK_VALUES` neighbour values (see `_gather_pool`); on accelerators
    all at once.
  """
  num_boxes = base.shape[0]
  rows = jnp.stack([ys.low, ys.high], axis=-1).reshape(num_boxes, ys.low.shape[1],
                                                         2 * ys.low.shape[2])
  wy = jnp.stack([ys.w_low, ys.w_high], axis=-1).reshape(rows.shape)
  cols = jnp.stack([xs.low, xs.high], axis=-1).reshape(num_boxes, xs.low.shape[1],
                                                         2 * xs.low.shape[2])
  wx = jnp.stack([xs.w_low, xs.w_high], axis=-1).reshape(cols.shape)
  stride = jnp.asarray(row_stride, jnp.int32)
  stride = stride if stride.ndim == 0 else stride[:, None, None]
  row_offsets = base[:, None, None] + rows * stride  # [K, P, Ty]
  index = row_offsets[:, :, :, None, None] + cols[:, None, None, :, :]  # [K, P, Ty, Q, Tx]
  weights = wy[:, :, :, None, None] * wx[:, None, None, :, :]  # no gradient: `_gather_pool`
  chunk = max(num_boxes, 1)
  if jax.default_backend() == 'cpu':
    values_per_box = math.prod(index.shape[1:]) * flat_features.shape[-1]
    chunk = min(chunk, max(1, _GATHER_CHUNK_VALUES // values_per_box))
  padded = -(-num_boxes // chunk) * chunk
  pad = [(0, padded - num_boxes)] + [(0, 0)] * 4
  # Padded boxes read pixel 0 with weight 0 (and add 0 to its gradient).
  out = _gather_pool(flat_features, jnp.pad(index, pad), jnp.pad(weights, pad), chunk)
  return out[:num_boxes]


def _gather_chunk(flat_features, index, weights):
  """[N, C], [k, P, Ty, Q, Tx] -> [k, P, Q, C]: the weighted sum of the neighbours."""
  values = flat_features.at[index].get(mode='promise_in_bounds')
  values = values.astype(weights.dtype)
  return jnp.sum(values * weights[..., None], axis=(2, 4)).astype(flat_features.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _gather_pool(flat_features, index, weights, chunk):
  """'gather' RoIAlign of K boxes (K a multiple of `chunk`), `chunk` boxes at a time.

  On CPU a chunk's neighbours (`[chunk, P, Ty, Q, Tx, C]`, 6.4 MB in float32) stay in
  cache between the gather and the sum, and the gradient's scatter-add goes the same way.
  All boxes at once materialised 411 MB for 512 boxes and ran 4-10x slower
  (experiments/roi_align/results.md).
  """
  out = jax.lax.map(lambda a: _gather_chunk(flat_features, a[0], a[1]),
                    (_chunks(index, chunk), _chunks(weights, chunk)))
  return out.reshape((-1,) + out.shape[2:])


def _gather_pool_fwd(flat_features, index, weights, chunk):
  return (_gather_pool(flat_features, index, weights, chunk),
          (index, weights, flat_features.shape))


def _gather_pool_bwd(chunk, residuals, grad):
  """Gradient w.r.t. the features only: each chunk's weighted output gradient
  scatter-added to the neighbours it was read from (in the weights' dtype; the
  output, hence its gradient, has the features' dtype)."""
  index, weights, shape = residuals
  channels = shape[-1]

  def body(grad_features, args):
    i, w, g = args
    updates = w[..., None] * g.astype(w.dtype)[:, :, None, :, None, :]
    grad_features = grad_features.at[i.reshape(-1)].add(
        updates.reshape(-1, channels), mode='promise_in_bounds')
    return grad_features, None

  grad_features, _ = jax.lax.scan(body, jnp.zeros(shape, weights.dtype),
                                  (_chunks(index, chunk), _chunks(weights, chunk),
                                   _chunks(grad, chunk)))
  return grad_features.astype(grad.dtype), None, None


_gather_pool.defvjp(_gather_pool_fwd, _gather_pool_bwd)


def interpolation_matrix(samples: AxisSamples, size: int) -> jax.Array:
  """Dense [K, P, size] matrix: bin p's average of its samples' bilinear weights."""
  pixels = jnp.arange(size, dtype=jnp.int32)
  weights = (jnp.where(samples.low[..., None] == pixels, samples.w_low[..., None], 0.0)
             + jnp.where(samples.high[..., None] == pixels, samples.w_high[..., None], 0.0))
  return jnp.sum(weights, axis=2)  # sum over samples


def _column_weights(ax: jax.Array, num_rows: int) -> jax.Array:
  """[k, Q, W] -> [k, P, Q, W]: the same column weights for every output row p."""
  return jnp.broadcast_to(ax[:, None], (ax.shape[0], num_rows) + ax.shape[1:])


def _pool_chunk(features, ay, ax, precision):
  """One chunk of boxes on one map: [H, W, C], [k, P, H], [k, Q, W] -> [k, P, Q, C]."""
  rows = jnp.einsum('kph,hwc->kpwc', ay, features, precision=precision)
  # Batched over (box, p) so that every operand and result keeps its natural
  # layout (a [k, Q, W] x [k, P, W, C] contraction makes XLA transpose `rows`).
  return jnp.einsum('kpqw,kpwc->kpqc', _column_weights(ax, ay.shape[1]), rows,
                    precision=precision)


def _chunks(x, chunk):
  return x.reshape((x.shape[0] // chunk, chunk) + x.shape[1:])


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _matmul_pool(features, ay, ax, chunk, precision):
  """'matmul' RoIAlign of R boxes on one map, `chunk` boxes at a time.

  Args:
    features: [H, W, C]; ay: [R, P, H]; ax: [R, Q, W] (R a multiple of `chunk`).

  Returns:
    [R, P, Q, C].
  """
  out = jax.lax.map(lambda a: _pool_chunk(features, a[0], a[1], precision),
                    (_chunks(ay, chunk), _chunks(ax, chunk)))
  return out.reshape((-1,) + out.shape[2:])


def _matmul_pool_fwd(features, ay, ax, chunk, precision):
  return _matmul_pool(features, ay, ax, chunk, precision), (ay, ax, features.shape)


def _matmul_pool_bwd(chunk, precision, residuals, grad):
  """Gradient w.r.t. the features only (`ay`, `ax` come from stop-gradient boxes).

  Per chunk: d_rows = Ax-weighted sum over q, then dF += Ay^T d_rows, with the
  map-sized accumulator as the scan carry: written by hand because autodiff of
  the mapped forward stored and transposed more than this on CPU.
  """
  ay, ax, shape = residuals

  def body(grad_features, args):
    a, x, g = args
    d_rows = jnp.einsum('kpqw,kpqc->kpwc', _column_weights(x, a.shape[1]), g,
                        precision=precision)
    return grad_features + jnp.einsum('kph,kpwc->hwc', a, d_rows,
                                      precision=precision).astype(grad_features.dtype), None

  grad_features, _ = jax.lax.scan(body, jnp.zeros(shape, grad.dtype),
                                  (_chunks(ay, chunk), _chunks(ax, chunk), _chunks(grad, chunk)))
  return grad_features, jnp.zeros_like(ay), jnp.zeros_like(ax)


_matmul_pool.defvjp(_matmul_pool_fwd, _matmul_pool_bwd)


def matmul_pool(features: jax.Array, ay: jax.Array, ax: jax.Array,
                precision: jax.lax.PrecisionLike = jax.lax.Precision.HIGHEST) -> jax.Array:
  """'matmul' RoIAlign: `out[b, r] = Ay[b, r] @ features[b] @ Ax[b, r].T` per channel.

  Args:
    features: [B, H, W, C].
    ay: [B, R, P, H] and ax: [B, R, Q, W] interpolation matrices (no gradient).

  Returns:
    [B, R, P, Q, C]. The [R, P, W, C] intermediate is built `_MATMUL_CHUNK`
    boxes at a time on CPU (cache-sized; 3-4x faster there than all at once),
    in one piece on accelerators.
  """
  num_rois = ay.shape[1]
  chunk = max(1, min(num_rois, _MATMUL_CHUNK) if jax.default_backend() == 'cpu' else num_rois)
  padded = -(-num_rois // chunk) * chunk
  pad = [(0, 0), (0, padded - num_rois), (0, 0), (0, 0)]
  ay = jnp.pad(ay.astype(features.dtype), pad)  # zero rows: padded boxes pool to 0
  ax = jnp.pad(ax.astype(features.dtype), pad)
  out = jax.vmap(_matmul_pool, in_axes=(0, 0, 0, None, None))(features, ay, ax, chunk,
                                                              precision)
  return out[:, :num_rois]


def _roi_align_inputs(features, output_size, spatial_scale, sampling_ratio, impl,
                      max_sampling_ratio):
  if features.ndim != 4:
    raise ValueError(f'RoIAlign features must be NHWC [B, H, W, C], got shape {features.shape}')
  output_size = _pair(output_size, 'output_size')
  spatial_scale = check_spatial_scale(spatial_scale)
  sampling_ratio = check_sampling_ratio(sampling_ratio)
  samples = samples_per_side(sampling_ratio, output_size, features.shape[1:3],
                             max_sampling_ratio)
  return output_size, spatial_scale, sampling_ratio, samples, resolve_impl(
      impl, samples, output_size, [features.shape[1:3]])


def _taps(boxes, height, width, output_size, spatial_scale, sampling_ratio, samples, aligned,
          dtype):
  x1, y1, x2, y2 = scaled_box_extents(boxes, spatial_scale, aligned, coordinate_dtype(dtype))
  ys = axis_samples(y1, y2, height, output_size[0], sampling_ratio, samples[0], aligned)
  xs = axis_samples(x1, x2, width, output_size[1], sampling_ratio, samples[1], aligned)
  return ys, xs


_STATIC = ('output_size', 'spatial_scale', 'sampling_ratio', 'aligned', 'impl',
           'max_sampling_ratio', 'precision')


@functools.partial(jax.jit, static_argnames=_STATIC)
def roi_align(features: jax.Array, boxes: jax.Array, output_size: int | Sequence[int], *,
              spatial_scale: float = 1.0, sampling_ratio: int = -1, aligned: bool = False,
              impl: str = 'auto', max_sampling_ratio: int | Sequence[int] | None = None,
              precision: jax.lax.PrecisionLike = jax.lax.Precision.HIGHEST) -> jax.Array:
  """RoIAlign of R boxes per image.

  Args:
    features: [B, H, W, C].
    boxes: [B, R, 4] `(x1, y1, x2, y2)` in image pixels (no gradient).
    output_size: P or (P, Q) bins.
    spatial_scale: feature pixels per image pixel (static).
    sampling_ratio: samples per bin side; 0 or -1 adaptive (see module doc).
    aligned: shift boxes by -0.5 pixel (pixel-centre alignment).
    impl: 'gather', 'matmul' or 'auto' (see module doc).
    max_sampling_ratio: adaptive sampling only: static bound (int or pair) on
      samples per bin side; None derives the exact bound from the map size.
    precision: of the 'matmul' contractions (HIGHEST keeps float32 exact on TPU).

  Returns:
    [B, R, P, Q, C] in the features' dtype.
  """
  output_size, spatial_scale, sampling_ratio, samples, impl = _roi_align_inputs(
      features, output_size, spatial_scale, sampling_ratio, impl, max_sampling_ratio)
  if boxes.ndim != 3 or boxes.shape[0] != features.shape[0] or boxes.shape[-1] != 4:
    raise ValueError(f'roi_align: boxes must have shape [B={features.shape[0]}, R, 4], '
                     f'got {boxes.shape}')
  batch, height, width, channels = features.shape
  num_rois = boxes.shape[1]
  ys, xs = _taps(boxes.reshape(-1, 4), height, width, output_size, spatial_scale,
                 sampling_ratio, samples, aligned, features.dtype)
  if impl == 'gather':
    base = jnp.repeat(jnp.arange(batch, dtype=jnp.int32) * (height * width), num_rois)
    out = gather_pool(features.reshape(-1, channels), base, width, ys, xs)
    return out.reshape(batch, num_rois, *output_size, channels)
  ay = interpolation_matrix(ys, height).reshape(batch, num_rois, output_size[0], height)
  ax = interpolation_matrix(xs, width).reshape(batch, num_rois, output_size[1], width)
  return matmul_pool(features, ay, ax, precision)


@functools.partial(jax.jit, static_argnames=_STATIC)
def roi_align_indexed(features: jax.Array, boxes: jax.Array, box_indices: jax.Array,
                      output_size: int | Sequence[int], *, spatial_scale: float = 1.0,
                      sampling_ratio: int = -1, aligned: bool = False, impl: str = 'auto',
                      max_sampling_ratio: int | Sequence[int] | None = None,
                      precision: jax.lax.PrecisionLike = jax.lax.Precision.HIGHEST
                      ) -> jax.Array:
  """RoIAlign in torchvision's layout: box k reads map `box_indices[k]`.

  Used where each box has its own source map, e.g. Mask R-CNN mask targets
  (a box reads its matched ground-truth mask). 'matmul' gathers one map per
  box (`[K, H, W, C]` memory); 'gather' reads the maps in place.

  Args:
    features: [N, H, W, C].
    boxes: [K, 4] image pixels.
    box_indices: [K] int in [0, N).
    other arguments: as `roi_align`.

  Returns:
    [K, P, Q, C].
  """
  output_size, spatial_scale, sampling_ratio, samples, impl = _roi_align_inputs(
      features, output_size, spatial_scale, sampling_ratio, impl, max_sampling_ratio)
  if boxes.ndim != 2 or boxes.shape[-1] != 4 or box_indices.shape != boxes.shape[:1]:
    raise ValueError(f'roi_align_indexed: boxes must be [K, 4] and box_indices [K], got '
                     f'{boxes.shape} and {box_indices.shape}')
  _, height, width, channels = features.shape
  box_indices = box_indices.astype(jnp.int32)
  ys, xs = _taps(boxes, height, width, output_size, spatial_scale, sampling_ratio,
                 samples, aligned, features.dtype)
  if impl == 'gather':
    return gather_pool(features.reshape(-1, channels), box_indices * (height * width),
                       width, ys, xs)
  # One map per box: [K, H, W, C] gathered, then each box is a batch of one.
  ay = interpolation_matrix(ys, height)[:, None]
  ax = interpolation_matrix(xs, width)[:, None]
  return matmul_pool(features[box_indices], ay, ax, precision)[:, 0]
