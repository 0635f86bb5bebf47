"""Building blocks shared by the backbones and heads.

Conventions (hold everywhere in `segjax.models`):
- Images and feature maps are NHWC; indices into H/W follow PyTorch semantics so
  that weights imported from torchvision give the same numbers.
- Convolutions pad like PyTorch (`padding=dilation * (k - 1) // 2` on *both*
  sides), not like TensorFlow's 'SAME' (which pads the extra row at the bottom):
  a stride-2 3x3 conv then samples the same input pixels as torchvision, and maps
  H -> ceil(H / 2).
- BatchNorm uses torchvision's numbers in flax's convention: flax `momentum=0.9`
  is `running = 0.9 * running + 0.1 * batch`, i.e. PyTorch `momentum=0.1`;
  `epsilon=1e-5`. (PyTorch keeps the *unbiased* batch variance in its running
  average, flax the biased one; the difference is N/(N-1) and only affects
  training-time statistics, never imported weights or eval outputs.) `BatchNorm` is
  flax's with a gradient that keeps less memory (`batch_norm_train`).
- Convolution kernels are HWIO: torchvision OIHW weights import as
  `w.transpose(2, 3, 1, 0)`.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

Dtype = Any
Initializer = Callable[..., jax.Array]

BN_MOMENTUM = 0.9  # flax convention; == PyTorch momentum 0.1
BN_EPSILON = 1e-5

# torchvision's conv init: kaiming_normal_(mode='fan_out', nonlinearity='relu'),
# an untruncated normal.
kaiming_normal_fan_out = nn.initializers.variance_scaling(2.0, 'fan_out', 'normal')


def _pair(v: int | Sequence[int]) -> tuple[int, int]:
  if isinstance(v, int):
    return (v, v)
  a, b = v
  return (int(a), int(b))


def torch_padding(kernel_size: int | Sequence[int],
                  dilation: int | Sequence[int] = 1) -> tuple[tuple[int, int], ...]:
  """PyTorch-style symmetric padding that keeps H at stride 1 for odd kernels.

  For even kernels (no PyTorch equivalent) the extra pixel goes after, like 'SAME'.
  """
  pads = []
  for k, d in zip(_pair(kernel_size), _pair(dilation)):
    total = d * (k - 1)
    pads.append((total // 2, total - total // 2))
  return tuple(pads)


# ---------------------------------------------------------------------------
# How a convolution is computed: `conv_weight_grad(...)` around tracing.
#
# XLA's CPU backend computes the filter gradient of a convolution (the backward conv
# with the batch as the contraction) several times slower than the forward conv or a
# matmul of the same FLOPs (DESIGN.md, "Known sharp edges"), and its forward conv
# slows to 43-67 GFLOP/s at the large dilations of DeepLab's ASPP (12/24/36 on a
# 40x40 map), against ~170 at dilation 2. Per-tap matmuls avoid both: a kxk conv is
# the sum over its k*k taps of (the input shifted to that tap) @ w[i, j], and each
# tap's matmul needs only the output window whose input is inside the image, so the
# products with the zero padding are never computed (at dilation 36 on 40x40 only
# the centre tap is whole). Same sums as the plain conv, in a different order.
#
# The choices:
# - 'xla': XLA's convolution and its gradients.
# - 'taps': XLA's forward and input gradient; the filter gradient as per-tap matmuls
#   (`filter_grad_taps`: dw[i, j] = x_shift(i, j)^T @ dy).
# - 'taps_1x1': 'taps' for 1x1 kernels only (there it is one matmul), XLA elsewhere.
# - 'tap_matmuls': where tap matmuls pay (`tap_matmuls_pay`: 1x1 kernels, convs with
#   at least `TAP_MATMUL_MIN_CHANNELS` = Cin * Cout, or with at least
#   `SPARSE_TAP_FRACTION` of the dense products on padding), both gradients as per-tap
#   matmuls over the valid windows (`conv_tap_matmuls`), and the forward too for 1x1
#   kernels and the mostly-padding convs; XLA's conv and gradients elsewhere (narrow
#   3x3 convs, where the per-tap slices and sums cost more than the matmuls save; from
#   64x64 channels on small maps their forward is Winograd's where it is not
#   differentiated, `conv_winograd_undifferentiated`).
#   The gradients of stride-1 kxk convs that are not mostly padding are two matmuls
#   over the shifted windows of the padded output gradient instead
#   (`conv_grads_from_output_windows`), and the wide dense 3x3 stride-1 float32 convs'
#   forward and input gradient are Winograd's F(2x2, 3x3) (`conv3x3_winograd`; the
#   input gradient with the flipped, transposed kernel), their filter gradient
#   F(3x3, 2x2) (`conv3x3_winograd_filter_grad`).
#   Before all that, stride-1 kxk convs on large maps (at least 2 x 160 x 160 outputs)
#   keep XLA's forward and input gradient and get XLA's filter gradient summed over
#   blocks of output rows (`conv_blocked_filter_grad`; 2.5-6x faster there). And
#   wide convs with kernels of 16+ taps (VGG's fc6) are one matmul over their patches
#   (`conv_im2col`), forward and gradients.
# - 'tap_matmuls_nested': 'tap_matmuls' for convs inside a conditional or loop body
#   (Mask R-CNN's mask branch in a `lax.switch`), where XLA CPU's own filter gradient
#   is ~40-80x slower (`segjax.benchmarks.nested_conv_bench`): the convs that
#   'tap_matmuls' leaves to XLA get 'taps' instead, and none is row-blocked.
# - 'auto' (the default): 'tap_matmuls' when JAX's default backend is the CPU, where
#   it measured fastest (experiments/benchmarks/README.md), and 'xla' elsewhere
#   (GPU/TPU convs are the vendor library's).

CONV_WEIGHT_GRADS = ('auto', 'xla', 'taps', 'taps_1x1', 'tap_matmuls', 'tap_matmuls_nested')
_CONV_WEIGHT_GRAD = contextvars.ContextVar('segjax_conv_weight_grad', default='auto')
# 'tap_matmuls' computes the forward as tap matmuls when at least this fraction of the
# dense conv's products multiply padding (measured: XLA's forward wins below ~0.2).
SPARSE_TAP_FRACTION = 0.2
# ... and computes the whole conv as tap matmuls only from this Cin * Cout up (measured:
# a 3x3 256->256 conv's gradients 1.6x faster as tap matmuls on 2x40x40, a 3x3 64->64
# one and the 16- to 128-channel convs of the digit_scenes ResNet-18 slower).
TAP_MATMUL_MIN_CHANNELS = 256 * 256


def resolve_conv_weight_grad(impl: str) -> str:
  """`impl` with 'auto' replaced by the choice for `jax.default_backend()`."""
  if impl == 'auto':
    return 'tap_matmuls' if jax.default_backend() == 'cpu' else 'xla'
  return impl


def current_conv_weight_grad() -> str:
  """The choice `conv2d` would make now (the innermost `conv_weight_grad`, resolved)."""
  return resolve_conv_weight_grad(_CONV_WEIGHT_GRAD.get())


@contextlib.contextmanager
def conv_weight_grad(impl: str) -> Iterator[None]:
  """Convs built by `conv2d` while tracing inside this context are computed by `impl`.

  One of CONV_WEIGHT_GRADS (see the comment above them); 'auto' is the default
  outside any context. The choice is read when a module is traced (its jit
  compiled), so wrap the first call of a jitted step.
  """
  if impl not in CONV_WEIGHT_GRADS:
    raise ValueError(f'conv_weight_grad={impl!r} is not valid; choose one of '
                     f'{list(CONV_WEIGHT_GRADS)}')
  token = _CONV_WEIGHT_GRAD.set(impl)
  try:
    yield
  finally:
    _CONV_WEIGHT_GRAD.reset(token)


_NHWC = ('NHWC', 'HWIO', 'NHWC')


def _conv_nhwc(x, w, strides, padding, dilation, precision=None):
  return lax.conv_general_dilated(x, w, strides, padding, rhs_dilation=dilation,
                                  dimension_numbers=_NHWC, precision=precision)


def filter_grad_taps(x: jax.Array, dy: jax.Array, kernel_shape: Sequence[int],
                     strides: tuple[int, int], padding: tuple[tuple[int, int], ...],
                     dilation: tuple[int, int]) -> jax.Array:
  """d(sum(conv(x, w) * dy)) / dw as per-tap matmuls.

  x: [B, H, W, C], dy: [B, Ho, Wo, K] -> [kh, kw, C, K] (HWIO), in w's layout; f32
  accumulation, the result in x's dtype.
  """
  kh, kw, cin, cout = kernel_shape
  batch, out_h, out_w, _ = dy.shape
  xp = jnp.pad(x, ((0, 0), tuple(padding[0]), tuple(padding[1]), (0, 0)))
  rows = dy.reshape(-1, cout)
  taps = []
  for i in range(kh):
    for j in range(kw):
      r0, c0 = i * dilation[0], j * dilation[1]
      shifted = lax.slice(xp, (0, r0, c0, 0),
                          (batch, r0 + (out_h - 1) * strides[0] + 1,
                           c0 + (out_w - 1) * strides[1] + 1, cin),
                          (1, strides[0], strides[1], 1))
      taps.append(lax.dot_general(shifted.reshape(-1, cin), rows, (((0,), (0,)), ((), ())),
                                  preferred_element_type=jnp.float32))
  return jnp.stack(taps).reshape(kh, kw, cin, cout).astype(x.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def conv_taps(x: jax.Array, w: jax.Array, strides: tuple[int, int],
              padding: tuple[tuple[int, int], ...], dilation: tuple[int, int]) -> jax.Array:
  """NHWC x HWIO conv whose filter gradient is `filter_grad_taps`; value = the plain conv."""
  return _conv_nhwc(x, w, strides, padding, dilation)


def _conv_taps_fwd(x, w, strides, padding, dilation):
  return _conv_nhwc(x, w, strides, padding, dilation), (x, w)


def _xla_input_grad(x, w, dy, strides, padding, dilation):
  """XLA's input gradient of the plain conv."""
  _, input_vjp = jax.vjp(lambda x_: _conv_nhwc(x_, w, strides, padding, dilation), x)
  return input_vjp(dy)[0]


def _conv_taps_bwd(strides, padding, dilation, residuals, dy):
  x, w = residuals
  return (_xla_input_grad(x, w, dy, strides, padding, dilation),
          filter_grad_taps(x, dy, w.shape, strides, padding, dilation).astype(w.dtype))


conv_taps.defvjp(_conv_taps_fwd, _conv_taps_bwd)


# XLA CPU's filter gradient of a stride-1 conv over a large map slows down several
# times against the same sums over blocks of output rows: a 3x3 128->128 conv on
# 2x160x160 took 456 ms whole and 158 ms in blocks of 8 rows, 64->64 on 2x320x320 452
# against 168 (VGG-16's conv2_2 and conv1_2 in the FCN train step, 2x320x320). Small
# maps gain nothing (2x80x80: 10.6 vs 11.9 ms), nor did one 256x256 image (58.6 vs 70).
# So 'tap_matmuls' sums the filter gradient over blocks of FILTER_GRAD_BLOCK_POSITIONS
# output positions (batch x rows x width) for stride-1 convs of a batch of at least 2
# whose output has at least FILTER_GRAD_BLOCK_MIN_AREA pixels per image.
FILTER_GRAD_BLOCK_POSITIONS = 4096
FILTER_GRAD_BLOCK_MIN_AREA = 160 * 160
FILTER_GRAD_MAX_BLOCKS = 64


def _static_dims(*dims) -> bool:
  """Whether every dim is a number (not a symbolic dim of `jax.export`'s shape polymorphism,
  which the size rules below cannot compare)."""
  return all(isinstance(d, int) for d in dims)


def filter_grad_rows(batch: int, out_hw: Sequence[int], strides: Sequence[int]) -> int | None:
  """Output rows per block of `filter_grad_row_blocks`, or None where it does not pay
  (or the batch or map size is symbolic)."""
  out_h, out_w = out_hw
  if (not _static_dims(batch, out_h, out_w) or tuple(strides) != (1, 1) or batch < 2
      or out_h * out_w < FILTER_GRAD_BLOCK_MIN_AREA):
    return None
  rows = max(1, FILTER_GRAD_BLOCK_POSITIONS // (batch * out_w))
  # At most FILTER_GRAD_MAX_BLOCKS blocks: they are unrolled in the program.
  return min(out_h, max(rows, -(-out_h // FILTER_GRAD_MAX_BLOCKS)))


def filter_grad_row_blocks(x: jax.Array, dy: jax.Array, kernel_shape: Sequence[int],
                           padding: tuple[tuple[int, int], ...], dilation: tuple[int, int],
                           rows: int) -> jax.Array:
  """XLA's filter gradient of a stride-1 conv, summed over blocks of `rows` output rows.

  Block b reads the input rows its outputs see (a halo of `dilation * (kh - 1)` rows).
  The same products as the plain filter gradient, summed in another order. The blocks
  are unrolled: XLA CPU ran the same conv inside a `fori_loop` over dynamic slices ~30x
  slower. Returns [kh, kw, C, K].
  """
  kh = kernel_shape[0]
  (top, bottom), cols = padding
  out_h = dy.shape[1]
  xp = jnp.pad(x, ((0, 0), (top, bottom), (0, 0), (0, 0)))
  kernel = jax.ShapeDtypeStruct(tuple(kernel_shape), x.dtype)
  total = None
  for start in range(0, out_h, rows):
    stop = min(out_h, start + rows)
    xs = xp[:, start:stop + dilation[0] * (kh - 1)]  # the input rows these outputs read
    (dw,) = jax.linear_transpose(
        lambda w, xs=xs: _conv_nhwc(xs, w, (1, 1), ((0, 0), cols), dilation), kernel)(
            dy[:, start:stop])
    dw = dw.astype(jnp.float32)
    total = dw if total is None else total + dw
  return total.astype(x.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def conv_blocked_filter_grad(x: jax.Array, w: jax.Array, padding: tuple[tuple[int, int], ...],
                             dilation: tuple[int, int], rows: int) -> jax.Array:
  """Stride-1 NHWC x HWIO conv: XLA's forward and input gradient, the filter gradient by
  `filter_grad_row_blocks` in blocks of `rows` output rows. Not differentiated, the
  forward is `conv3x3_winograd` where `winograd_pays`, as in `conv_tap_matmuls`."""
  if winograd_pays(x, w, (1, 1), padding, dilation):
    return conv3x3_winograd(x, w, padding, dilation)
  return _conv_nhwc(x, w, (1, 1), padding, dilation)


def _conv_blocked_fwd(x, w, padding, dilation, rows):
  return _conv_nhwc(x, w, (1, 1), padding, dilation), (x, w)


def _conv_blocked_bwd(padding, dilation, rows, residuals, dy):
  x, w = residuals
  return (_xla_input_grad(x, w, dy, (1, 1), padding, dilation),
          filter_grad_row_blocks(x, dy, w.shape, padding, dilation, rows).astype(w.dtype))


conv_blocked_filter_grad.defvjp(_conv_blocked_fwd, _conv_blocked_bwd)


def _tap_windows(in_size: int, out_size: int, kernel: int, stride: int, pad_lo: int,
                 dilation: int) -> list[tuple[int, int, int, int]]:
  """Per tap along one axis: (tap, first input index, first output, end output) of the
  outputs whose input `stride * o + tap * dilation - pad_lo` lies inside [0, in_size)."""
  windows = []
  for tap in range(kernel):
    offset = tap * dilation - pad_lo
    first = max(0, -(offset // stride))  # ceil(-offset / stride)
    end = min(out_size, (in_size - 1 - offset) // stride + 1)
    if end > first:
      windows.append((tap, stride * first + offset, first, end))
  return windows


def _conv_out_size(in_size, kernel, stride, pad, dilation):
  return (in_size + pad[0] + pad[1] - dilation * (kernel - 1) - 1) // stride + 1


def padding_fraction(in_hw: Sequence[int], kernel_hw: Sequence[int],
                     strides: Sequence[int], padding: Sequence[Sequence[int]],
                     dilation: Sequence[int]) -> float:
  """The fraction of a dense conv's products that multiply padding (0 for 1x1)."""
  fractions = []
  for n, k, s, p, d in zip(in_hw, kernel_hw, strides, padding, dilation):
    out = _conv_out_size(n, k, s, p, d)
    valid = sum(end - first for _, _, first, end in _tap_windows(n, out, k, s, p[0], d))
    fractions.append(valid / (k * out))
  return 1.0 - fractions[0] * fractions[1]


def conv_as_tap_matmuls(x: jax.Array, w: jax.Array, strides: tuple[int, int],
                        padding: tuple[tuple[int, int], ...],
                        dilation: tuple[int, int], *, ordered: bool = False) -> jax.Array:
  """The NHWC x HWIO conv as one matmul per kernel tap over its valid output window.

  Taps whose window is empty (wholly in the padding) are skipped. Each matmul
  accumulates in float32 and the sum is cast to x's dtype once. `ordered` (where it is
  not differentiated): each tap's window and kernel wait for the previous tap's sum
  (`after`); left free, XLA copied every tap's window first and every kernel tap at the
  program's start (DeepLabV3-ResNet50 inference, 2x320x320: 170 MB of windows and 50 MB
  of kernel taps live at once in its dilated ASPP convs).
  """
  batch, in_h, in_w, cin = x.shape
  kh, kw, _, cout = w.shape
  out_h = _conv_out_size(in_h, kh, strides[0], padding[0], dilation[0])
  out_w = _conv_out_size(in_w, kw, strides[1], padding[1], dilation[1])
  rows = _tap_windows(in_h, out_h, kh, strides[0], padding[0][0], dilation[0])
  cols = _tap_windows(in_w, out_w, kw, strides[1], padding[1][0], dilation[1])
  total = None
  for i, r_in, r0, r1 in rows:
    for j, c_in, c0, c1 in cols:
      xt, wt = x, w[i, j]
      if ordered and total is not None:
        xt, wt = after(total, xt, wt)
      window = lax.slice(xt, (0, r_in, c_in, 0),
                         (batch, r_in + strides[0] * (r1 - r0 - 1) + 1,
                          c_in + strides[1] * (c1 - c0 - 1) + 1, cin),
                         (1, strides[0], strides[1], 1))
      # A 2-D matmul: differentiated, its filter gradient is one 2-D dot XLA runs on
      # the untransposed operands; over the 4-D window, XLA CPU transposed the output
      # gradient for it (a copy fused with BatchNorm's backward, ~100 ms for ResNet-50's
      # 2x40x40x2048), and the FCN-ResNet50 train step took 1.2x as long.
      part = lax.dot_general(window.reshape(-1, cin), wt, (((1,), (0,)), ((), ())),
                             preferred_element_type=jnp.float32)
      part = part.reshape(batch, r1 - r0, c1 - c0, cout)
      if (r0, r1, c0, c1) != (0, out_h, 0, out_w):
        part = jnp.pad(part, ((0, 0), (r0, out_h - r1), (c0, out_w - c1), (0, 0)))
      total = part if total is None else total + part
  if total is None:  # every tap in the padding: the conv of zeros
    return jnp.zeros((batch, out_h, out_w, cout), x.dtype)
  return total.astype(x.dtype)


def _tap_matmuls_forward_is_faster(x_shape, w_shape, strides, padding, dilation) -> bool:
  if tuple(w_shape[:2]) == (1, 1):
    return True
  return padding_fraction(x_shape[1:3], w_shape[:2], strides, padding,
                          dilation) >= SPARSE_TAP_FRACTION


def tap_matmuls_pay(x_shape, w_shape, strides, padding, dilation) -> bool:
  """Whether 'tap_matmuls' computes this conv as tap matmuls (else it is XLA's)."""
  _, _, cin, cout = w_shape
  return (cin * cout >= TAP_MATMUL_MIN_CHANNELS
          or _tap_matmuls_forward_is_faster(x_shape, w_shape, strides, padding, dilation))


# Winograd's minimal filtering F(2x2, 3x3) (Lavin & Gray, "Fast Algorithms for
# Convolutional Neural Networks", CVPR 2016): a 2x2 output tile of a 3x3 conv from a
# 4x4 input tile d is A^T [(G g G^T) * (B^T d B)] A, 16 multiplies instead of 36, so a
# wide conv becomes 16 matmuls with 4/9 of the direct conv's FLOPs, plus transforms
# that are sums. Rows are B^T, G and A^T; 0.5 is exact in every float format.
_WINOGRAD_BT = ((1, 0, -1, 0), (0, 1, 1, 0), (0, -1, 1, 0), (0, 1, 0, -1))
_WINOGRAD_G = ((1, 0, 0), (0.5, 0.5, 0.5), (0.5, -0.5, 0.5), (0, 0, 1))
_WINOGRAD_AT = ((1, 1, 1, 0), (0, 1, -1, -1))


def _combine(matrix, items):
  """[sum_j matrix[i][j] * items[j] for each row i], skipping zero coefficients."""
  out = []
  for row in matrix:
    total = None
    for coefficient, item in zip(row, items):
      if coefficient == 0:
        continue
      term = item if coefficient == 1 else -item if coefficient == -1 else item * coefficient
      total = term if total is None else total + term
    out.append(total)
  return out


def _winograd_taps(x: jax.Array, axis: int, tiles: int) -> list[jax.Array]:
  """The 4 input positions of each output tile along `axis`, transformed by B^T.

  `x` holds that axis split as [tiles + 1, 2, dilation]: tile q with offset r reads
  input rows 2*d*q + r + d*s for s = 0..3: index [q, s, r] of the split axis for s < 2,
  [q + 1, s - 2, r] for s >= 2.
  """
  def take(block, half):
    start = [0] * x.ndim
    limit = list(x.shape)
    start[axis], limit[axis] = block, block + tiles
    start[axis + 1], limit[axis + 1] = half, half + 1
    return lax.squeeze(lax.slice(x, start, limit), (axis + 1,))
  return _combine(_WINOGRAD_BT, [take(0, 0), take(0, 1), take(1, 0), take(1, 1)])


# G applied to a reversed 3-tap kernel is G applied to the kernel with rows 0 and 3
# swapped (rows 1 and 2 are symmetric): the transformed kernel of the input gradient's
# conv (flipped taps) is the forward's, re-indexed.
_WINOGRAD_G_REVERSED = (3, 1, 2, 0)


def conv3x3_winograd(x: jax.Array, w: jax.Array, padding: tuple[tuple[int, int], ...],
                     dilation: tuple[int, int], *, flip_transpose: bool = False) -> jax.Array:
  """The stride-1 NHWC x HWIO 3x3 conv (any padding and dilation) by F(2x2, 3x3).

  `flip_transpose=True` convolves with the kernel `w[::-1, ::-1]` with its input and
  output channels swapped (w is still [3, 3, A, B]; x has B channels, the result A): the
  input gradient's conv. It reads w in place, the transformed taps re-indexed
  (`_WINOGRAD_G_REVERSED`) and contracted on their last dimension: transposing w inside
  the program instead made XLA read it transposed in the kernel transform, 2.7x slower
  (375 vs 141 ms for the 2048->512 head's input gradient on 2x40x40).

  With dilation d the tiles lie on the dilated lattice: a tile's two outputs along an
  axis are d apart and read inputs d apart. The output is computed on a grid rounded
  up to a multiple of 2d (the input padded with zeros to match), then cropped. Same
  products as the direct conv up to float rounding (max error ~1e-6 of the largest
  output in float32, tests/test_layers.py).
  """
  batch, height, width, _ = x.shape
  cout = w.shape[2] if flip_transpose else w.shape[3]
  (top, bottom), (left, right) = padding
  dh, dw = dilation
  out_h = height + top + bottom - 2 * dh
  out_w = width + left + right - 2 * dw
  tiles_h, tiles_w = -(-out_h // (2 * dh)), -(-out_w // (2 * dw))
  tiles = batch * tiles_h * dh * tiles_w * dw
  in_chunks = _winograd_chunks(x, tiles)
  # The products (and the output's inverse transform) by output-channel chunks where
  # the input is one chunk, its transform shared (the 2048-channel input gradient of
  # FCN-ResNet50's head, 2x40x40: 100 MB of products at once, 4x its output). With
  # several input chunks each output chunk would transform the input again.
  out_chunk = cout if len(in_chunks) > 1 else _winograd_channel_chunk(tiles, cout)
  shared_v = None
  ys = []
  # Each chunk's transforms wait for x and for the previous chunk's products (or output):
  # left free, XLA computed every chunk's transformed input and kernel first
  # (FCN-ResNet50 inference: 165 of its 176 MB of temporaries at the 2048->512 head, 64
  # MB of them kernels; and transformed kernels of layer4 held from the program's start).
  previous = x
  for o0 in range(0, cout, out_chunk):
    o1 = min(o0 + out_chunk, cout)
    m = [None] * 16                                  # index 4 * col + row
    for c0, c1 in in_chunks:
      wc = w[:, :, o0:o1, c0:c1] if flip_transpose else w[:, :, c0:c1, o0:o1]
      if shared_v is None:
        xc, wc = after(previous, x[..., c0:c1], wc)
        v = _winograd_input_tiles(xc, tiles_h, tiles_w, padding, dilation)
        if len(in_chunks) == 1:
          shared_v = v
      else:
        v, (wc,) = shared_v, after(previous, wc)
      # G g G^T, in the same (col, row) order as v.
      g_rows = _combine(_WINOGRAD_G, [wc[0], wc[1], wc[2]])          # 4 x [3 (kw), ., .]
      g = [_combine(_WINOGRAD_G, [r[0], r[1], r[2]]) for r in g_rows]  # g[row][col]
      for k in range(16):
        row, col = k % 4, k // 4
        if flip_transpose:                           # [tiles, c] x [co, c]^T
          tap = g[_WINOGRAD_G_REVERSED[row]][_WINOGRAD_G_REVERSED[col]]
          part = lax.dot_general(v[k], tap, (((1,), (1,)), ((), ())),
                                 preferred_element_type=jnp.float32)
        else:
          part = jnp.dot(v[k], g[row][col], preferred_element_type=jnp.float32)
        m[k] = part if m[k] is None else m[k] + part
      previous = _first_elements(m)
    y = _winograd_output(m, batch, tiles_h, tiles_w, dilation, o1 - o0)[:, :out_h, :out_w]
    if out_chunk < cout:
      # Stored, not recomputed from its products by the concatenation below (XLA fuses
      # the inverse transform into its consumers), and the next chunk waits for it.
      y = computed_once(y)
      previous = y
    ys.append(y)
  return (ys[0] if len(ys) == 1 else jnp.concatenate(ys, axis=-1)).astype(x.dtype)


def _winograd_output(m: list[jax.Array], batch: int, tiles_h: int, tiles_w: int,
                     dilation: tuple[int, int], channels: int) -> jax.Array:
  """A^T m A of the 16 products m (index 4 * col + row, each [tiles, channels]): the
  [batch, 2 * dh * tiles_h, 2 * dw * tiles_w, channels] output tiles."""
  dh, dw = dilation
  m = [mk.reshape(batch, tiles_h, dh, tiles_w, dw, channels) for mk in m]
  # Along the columns (for each row), then along the rows.
  by_col = [_combine(_WINOGRAD_AT, [m[4 * c + r] for c in range(4)]) for r in range(4)]
  y = jnp.stack([jnp.stack(_combine(_WINOGRAD_AT, [by_col[r][oc] for r in range(4)]))
                 for oc in range(2)])                            # [out col, out row, ...]
  return y.transpose(2, 3, 1, 4, 5, 0, 6, 7).reshape(
      batch, 2 * dh * tiles_h, 2 * dw * tiles_w, channels)


def _winograd_chunks(x: jax.Array, tiles: int) -> list[tuple[int, int]]:
  """The ranges [c0, c1) of x's input channels whose transformed inputs
  (`_winograd_input_tiles`) are computed one at a time.

  The transformed input is 4x the input, hence the chunks (FCN-ResNet50 inference's XLA
  temp buffer: 258 MB unchunked, 209 MB with 32 MB chunks).
  """
  cin = x.shape[-1]
  chunk = _winograd_channel_chunk(tiles, cin)
  return [(c0, min(c0 + chunk, cin)) for c0 in range(0, cin, chunk)]


def _winograd_input_tiles(x: jax.Array, tiles_h: int, tiles_w: int,
                          padding: tuple[tuple[int, int], ...],
                          dilation: tuple[int, int]) -> list[jax.Array]:
  """The 16 transformed 4x4 input tiles B^T d B (index 4 * col + row), each
  [tiles, channels], of the tiles_h x tiles_w output tiles (2d x 2d each) on the dilated
  lattice.

  They stay 16 arrays: stacked into one [16, ...] operand for a batched matmul, XLA
  CPU's concatenate made the input transform ~5x slower (42 vs 8 ms for 512 channels on
  2x40x40).
  """
  batch, height, width, channels = x.shape
  (top, _), (left, _) = padding
  dh, dw = dilation
  pads = ((0, 0), (top, 2 * dh * (tiles_h + 1) - height - top),
          (left, 2 * dw * (tiles_w + 1) - width - left), (0, 0))
  xp = jnp.pad(x, pads).reshape(batch, tiles_h + 1, 2, dh, tiles_w + 1, 2, dw, channels)
  # B^T d B: along the columns, then along the rows of each column result.
  cols = _winograd_taps(xp, 4, tiles_w)              # 4 x [b, th+1, 2, dh, tw, dw, c]
  return [row.reshape(-1, channels) for col in cols
          for row in _winograd_taps(col, 1, tiles_h)]


# The filter gradient of a 3x3 conv by Winograd's F(3x3, 2x2) (Lavin & Gray §4: the
# filter gradient is a correlation of x with dy, the 3x3 taps its outputs): per 2x2 tile
# of dy and the 4x4 tile of x it meets, 16 products instead of 36. The x tiles and their
# transform B^T d B are the forward's; dy's 2x2 tiles are transformed by G' (4x2) and the
# 16 transformed taps are summed over all tiles and images by matmuls; A'^T (3x4) gives
# the taps. Rows of G' and A'^T (points 0, 1, -1 and infinity, checked against the
# direct correlation in tests/test_layers.py).
_WINOGRAD_FILTER_G = ((1, 0), (0.5, 0.5), (0.5, -0.5), (0, 1))
_WINOGRAD_FILTER_AT = ((1, 1, 1, 0), (0, 1, -1, 0), (0, 1, 1, -1))


def conv3x3_winograd_filter_grad(x: jax.Array, dy: jax.Array,
                                 padding: tuple[tuple[int, int], ...],
                                 dilation: tuple[int, int]) -> jax.Array:
  """dw [3, 3, Cin, Cout] of the stride-1 NHWC 3x3 conv of x with output gradient dy,
  by F(3x3, 2x2) on the forward's dilated tile lattice (dy zero-padded to whole tiles).
  f32 accumulation; x's channels in chunks as in `conv3x3_winograd`."""
  batch, out_h, out_w, cout = dy.shape
  dh, dw = dilation
  tiles_h, tiles_w = -(-out_h // (2 * dh)), -(-out_w // (2 * dw))
  dyp = jnp.pad(dy, ((0, 0), (0, 2 * dh * tiles_h - out_h), (0, 2 * dw * tiles_w - out_w),
                     (0, 0))).reshape(batch, tiles_h, 2, dh, tiles_w, 2, dw, cout)
  # G' g G'^T: along the columns, then along the rows; u[4 * col + row] as v below.
  dy_cols = _combine(_WINOGRAD_FILTER_G, [dyp[:, :, :, :, :, 0], dyp[:, :, :, :, :, 1]])
  u = [row.reshape(-1, cout) for col in dy_cols
       for row in _combine(_WINOGRAD_FILTER_G, [col[:, :, 0], col[:, :, 1]])]
  chunks = _winograd_chunks(x, batch * tiles_h * dh * tiles_w * dw)
  dws = []
  previous = dy
  for c0, c1 in chunks:
    # One chunk's transformed input at a time, as in `conv3x3_winograd`.
    xc, = after(previous, x[..., c0:c1])
    v = _winograd_input_tiles(xc, tiles_h, tiles_w, padding, dilation)
    m = [lax.dot_general(v[k], u[k], (((0,), (0,)), ((), ())),
                         preferred_element_type=jnp.float32) for k in range(16)]  # [c, cout]
    # A'^T M A': along the columns (for each row), then along the rows.
    by_col = [_combine(_WINOGRAD_FILTER_AT, [m[4 * c + r] for c in range(4)]) for r in range(4)]
    taps = [_combine(_WINOGRAD_FILTER_AT, [by_col[r][j] for r in range(4)]) for j in range(3)]
    dwc = jnp.stack([jnp.stack([taps[j][i] for j in range(3)]) for i in range(3)])
    if len(chunks) > 1:
      # The chunk's taps stored (9/16 of its products) before the next chunk starts.
      dwc = computed_once(dwc)
      previous = dwc
    dws.append(dwc)
  return dws[0] if len(dws) == 1 else jnp.concatenate(dws, axis=2)


# conv3x3_winograd's transformed input is computed in input-channel chunks of at most
# this many bytes (FCN-ResNet50's 2048->512 head on 2x40x40: 105 MB whole).
WINOGRAD_CHUNK_BYTES = 32 * 2**20


def _winograd_channel_chunk(tiles: int, cin: int) -> int:
  """The largest divisor of `cin` whose transformed-input chunk fits the budget
  (at least 1 channel); whole `cin` when it fits."""
  for parts in range(1, cin + 1):
    if cin % parts == 0 and 16 * tiles * (cin // parts) * 4 <= WINOGRAD_CHUNK_BYTES:
      return cin // parts
  return 1


# Narrower dense 3x3 convs (ResNet's 64- and 128-channel stages) are Winograd's from this
# Cin * Cout up, on at most this many output tiles: per op (forward, input and filter
# gradient), against XLA's conv, 2x80x80 64->64 5.5 / 4.9 / 7.7 vs 13.2 / 7.7 / 11.6 ms,
# 2x40x40 128->128 3.7 / 5.3 / 4.0 vs 8.4 / 5.5 / 5.9 ms; on larger maps the transformed
# tiles outgrow the caches (forward on 2x160x160 128->128: 251 vs 91 ms; 1x128x128
# 64->64: 8.1 vs 6.4 ms).
WINOGRAD_NARROW_MIN_CHANNELS = 64 * 64
WINOGRAD_NARROW_MAX_TILES = 3200


def winograd_pays(x, w, strides, padding, dilation) -> bool:
  """Whether `conv_tap_matmuls`'s forward uses `conv3x3_winograd`:
  dense (not mostly padding) 3x3 stride-1 float32 convs with Cin * Cout at least
  TAP_MATMUL_MIN_CHANNELS (measured against XLA's conv on 2x40x40, under load: 1.6x
  faster for 2048->512, 1.8x for 512->512 at dilation 4, 1.4x for 256->256 at dilation 2),
  or at least WINOGRAD_NARROW_MIN_CHANNELS on at most WINOGRAD_NARROW_MAX_TILES 2x2
  output tiles; narrower convs are left to XLA, as in the tests' small models."""
  kh, kw, cin, cout = w.shape
  if not ((kh, kw) == (3, 3) and tuple(strides) == (1, 1)
          and x.dtype == jnp.float32 and w.dtype == jnp.float32
          and not _tap_matmuls_forward_is_faster(x.shape, w.shape, strides, padding,
                                                 dilation)):
    return False
  if cin * cout >= TAP_MATMUL_MIN_CHANNELS:
    return True
  if cin * cout < WINOGRAD_NARROW_MIN_CHANNELS or not _static_dims(*x.shape[:3]):
    return False
  out_h, out_w = (_conv_out_size(x.shape[1 + a], 3, 1, padding[a], dilation[a])
                  for a in range(2))
  return x.shape[0] * -(-out_h // 2) * -(-out_w // 2) <= WINOGRAD_NARROW_MAX_TILES


# A wide conv with a large kernel (FCN's 7x7 fc6 512->4096, DeepLab v1's 4x4 fc6) as one
# matmul over its patches ("im2col": each output position's kh*kw*Cin inputs in a row),
# forward and both gradients by autodiff: FCN-VGG16's fc6 on 2x10x10, forward + both
# gradients, 819 ms against 2,287 ms (XLA's conv) and 2,506 ms (tap matmuls); on 2x16x16
# 1.9 vs 3.6 s; DeepLab v1's 4x4 dilation-4 fc6 on 2x40x40 4.1 vs 6.4 s (XLA) and 5.1 s
# (tap matmuls). 3x3 convs gained nothing (512->512 on 2x20x20 and 2x40x40: within 10 %).
IM2COL_MIN_TAPS = 16
# ... unless more than this fraction of the patches is padding (fc6 on 2x10x10: 0.31):
# a dilated fc6 on a map smaller than its reach (DeepLab v1's 7x7 rate-4 fc6 on 6x6 in
# the digit_scenes preset: 0.94) is left to the tap matmuls, which skip the padding.
IM2COL_MAX_PADDING_FRACTION = 0.5
# The patches are built for this many bytes of them at a time (images per chunk).
IM2COL_CHUNK_BYTES = 64 * 2**20


def im2col_pays(x_shape, w_shape, strides, padding, dilation) -> bool:
  """Whether 'tap_matmuls' computes a conv by `conv_im2col`: stride-1 convs with at least
  IM2COL_MIN_TAPS kernel taps, Cin * Cout at least TAP_MATMUL_MIN_CHANNELS and at most
  IM2COL_MAX_PADDING_FRACTION of the products on padding; not for symbolic input shapes
  (its chunks are whole images)."""
  kh, kw, cin, cout = w_shape
  return (_static_dims(*x_shape) and kh * kw >= IM2COL_MIN_TAPS
          and cin * cout >= TAP_MATMUL_MIN_CHANNELS
          and tuple(strides) == (1, 1)
          and padding_fraction(x_shape[1:3], w_shape[:2], strides, padding,
                               dilation) <= IM2COL_MAX_PADDING_FRACTION)


def conv_im2col(x: jax.Array, w: jax.Array, padding: tuple[tuple[int, int], ...],
                dilation: tuple[int, int]) -> jax.Array:
  """Stride-1 NHWC x HWIO conv as a matmul of its patches [positions, kh*kw*Cin] by
  w reshaped to [kh*kw*Cin, Cout], IM2COL_CHUNK_BYTES of patches at a time (whole
  images per chunk). The plain conv's products, summed in another order; its gradients
  are autodiff's (matmuls, and the patches' transpose: sums of shifted windows)."""
  batch, height, width, cin = x.shape
  kh, kw, _, cout = w.shape
  out_h = _conv_out_size(height, kh, 1, padding[0], dilation[0])
  out_w = _conv_out_size(width, kw, 1, padding[1], dilation[1])
  per_image = out_h * out_w * kh * kw * cin * jnp.dtype(x.dtype).itemsize
  chunk = max(1, min(batch, IM2COL_CHUNK_BYTES // per_image))
  xp = jnp.pad(x, ((0, 0), tuple(padding[0]), tuple(padding[1]), (0, 0)))
  kernel = w.astype(x.dtype).reshape(kh * kw * cin, cout)
  outs = []
  for start in range(0, batch, chunk):
    part = xp[start:start + chunk]
    cols = [part[:, i * dilation[0]:i * dilation[0] + out_h,
                 j * dilation[1]:j * dilation[1] + out_w] for i in range(kh) for j in range(kw)]
    patches = jnp.concatenate(cols, axis=-1).reshape(-1, kh * kw * cin)
    out = jnp.dot(patches, kernel, preferred_element_type=jnp.float32)
    outs.append(out.reshape(part.shape[0], out_h, out_w, cout))
  return jnp.concatenate(outs).astype(x.dtype)


def blocked_filter_grad_rows(x_shape, w_shape, strides, padding, dilation) -> int | None:
  """Rows per block where 'tap_matmuls' computes a conv's filter gradient in row blocks
  (`conv_blocked_filter_grad`), else None: kxk (not 1x1) convs that are not mostly
  padding, on the large maps of `filter_grad_rows`."""
  if tuple(w_shape[:2]) == (1, 1) or _tap_matmuls_forward_is_faster(
      x_shape, w_shape, strides, padding, dilation):
    return None
  out_hw = [_conv_out_size(x_shape[1 + a], w_shape[a], strides[a], padding[a], dilation[a])
            for a in range(2)]
  return filter_grad_rows(x_shape[0], out_hw, strides)


def _conv_tap_matmuls_where_they_pay(x, w, strides, padding, dilation, nested=False):
  """'tap_matmuls' (`nested`: 'tap_matmuls_nested', never XLA's filter gradient)."""
  if im2col_pays(x.shape, w.shape, strides, padding, dilation):
    return conv_im2col(x, w, padding, dilation)
  rows = None if nested else blocked_filter_grad_rows(x.shape, w.shape, strides, padding,
                                                      dilation)
  if rows is not None:
    return conv_blocked_filter_grad(x, w, padding, dilation, rows)
  if tap_matmuls_pay(x.shape, w.shape, strides, padding, dilation):
    return conv_tap_matmuls(x, w, strides, padding, dilation)
  if not nested and winograd_pays(x, w, strides, padding, dilation):
    return conv_winograd_undifferentiated(x, w, padding, dilation)
  if nested:
    return conv_taps(x, w, strides, padding, dilation)
  return _conv_nhwc(x, w, strides, padding, dilation)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def conv_winograd_undifferentiated(x: jax.Array, w: jax.Array,
                                   padding: tuple[tuple[int, int], ...],
                                   dilation: tuple[int, int]) -> jax.Array:
  """The narrow convs' rule: the stride-1 3x3 conv by `conv3x3_winograd` where it is not
  differentiated; differentiated, XLA's conv and gradients. FCN-ResNet50 (2x320x320,
  in-process A/Bs, 7 pairs): inference 1.02x as fast with Winograd's forward for its
  64- and 128-channel convs; the train step 0.99x with it, also with XLA's gradients."""
  return conv3x3_winograd(x, w, padding, dilation)


def _conv_winograd_undifferentiated_fwd(x, w, padding, dilation):
  return _conv_nhwc(x, w, (1, 1), padding, dilation), (x, w)


def _conv_winograd_undifferentiated_bwd(padding, dilation, residuals, dy):
  x, w = residuals
  _, vjp = jax.vjp(lambda x_, w_: _conv_nhwc(x_, w_, (1, 1), padding, dilation), x, w)
  return vjp(dy)


conv_winograd_undifferentiated.defvjp(_conv_winograd_undifferentiated_fwd,
                                      _conv_winograd_undifferentiated_bwd)


@jax.custom_vjp
def computed_once(x: jax.Array) -> jax.Array:
  """x, which XLA CPU then computes once where it is not differentiated.

  XLA's fusion recomputes a cheap elementwise value inside each consumer it fuses with,
  and so recomputed each ResNet block's output (ReLU of the BatchNorm'd conv plus the
  block's input, itself such a value) in the next block's residual add: every block's
  output was rebuilt from all of its stage's conv outputs, which stayed alive to the
  stage's end (FCN-ResNet50 inference, 2x320x320: layer4's four 25 MB outputs at once).
  A division is one of the ops XLA never duplicates; x / 1 is exact, and the 1 is made
  from x (1 + 0 * isnan(x)) so that XLA cannot fold it away. Differentiated, x as it is
  (the gradient is dy), since training keeps those outputs for the backward anyway.
  """
  return x / (1 + jnp.isnan(x).astype(x.dtype) * 0)


computed_once.defvjp(lambda x: (x, None), lambda _, dy: (dy,))


def recompute_in_backward(fn: Callable[..., Any]) -> Callable[..., Any]:
  """`fn` (pure, array pytrees in and out) whose gradient keeps only its arguments and
  runs `fn` again in the backward pass for the rest: rematerialisation, as
  `jax.checkpoint` means it, that also holds on XLA CPU.

  There `jax.checkpoint` costs memory instead of saving it: XLA CPU drops the
  optimization barriers that keep the recomputation apart, so the recomputed values are
  merged with the forward's or computed early (FCN-ResNet50 train step, 2x320x320,
  every ResNet block checkpointed: XLA's temporaries 643 -> 856 MB). Here the
  recomputation starts from the arguments made from the output's gradient (`after`):
  it can neither run before the backward reaches it nor be merged with the forward.
  The first output leaf's gradient is the anchor; outputs without a gradient (e.g.
  BatchNorm's running averages) get zeros.
  """

  @jax.custom_vjp
  def recomputed(*args):
    return fn(*args)

  def forward(*args):
    return fn(*args), args

  def backward(args, cotangents):
    leaves, treedef = jax.tree.flatten(args)
    anchor = jax.tree.leaves(cotangents)[0]
    _, vjp = jax.vjp(fn, *jax.tree.unflatten(treedef, after(anchor, *leaves)))
    return vjp(cotangents)

  recomputed.defvjp(forward, backward)
  return recomputed


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def conv_tap_matmuls(x: jax.Array, w: jax.Array, strides: tuple[int, int],
                     padding: tuple[tuple[int, int], ...],
                     dilation: tuple[int, int]) -> jax.Array:
  """NHWC x HWIO conv whose gradients are those of `conv_as_tap_matmuls`.

  The forward is `conv3x3_winograd` where `winograd_pays`, else `conv_as_tap_matmuls`
  for 1x1 kernels and where at least SPARSE_TAP_FRACTION of the dense products would
  multiply padding, else XLA's conv.
  """
  return _conv_tap_matmuls_forward(x, w, strides, padding, dilation)


def _conv_tap_matmuls_forward(x, w, strides, padding, dilation):
  if winograd_pays(x, w, strides, padding, dilation):
    return conv3x3_winograd(x, w, padding, dilation)
  if _tap_matmuls_forward_is_faster(x.shape, w.shape, strides, padding, dilation):
    return conv_as_tap_matmuls(x, w, strides, padding, dilation, ordered=True)
  return _conv_nhwc(x, w, strides, padding, dilation)


def _conv_tap_matmuls_fwd(x, w, strides, padding, dilation):
  # Differentiated, the forward is the same: Winograd's forward made the FCN-ResNet50
  # train step 1.07x as fast (in-process A/B, 5 pairs, 2026-12-04, after the backward
  # above; an A/B before it, in session 12, read 0.97).
  return _conv_tap_matmuls_forward(x, w, strides, padding, dilation), (x, w)


def _first_elements(arrays: Sequence[jax.Array]) -> jax.Array:
  """The sum of the first elements of `arrays`: an anchor for `after` that exists only
  once all of them do."""
  return sum(lax.index_in_dim(a.reshape(-1), 0, keepdims=False) for a in arrays)


def after(dy: jax.Array, *arrays: jax.Array) -> list[jax.Array]:
  """`arrays` unchanged in value but computed from `dy` (+ a zero made from one element
  of dy), e.g. for a backward pass: XLA then neither merges what the backward computes
  from them with the forward's identical computations (CSE: the forward's Winograd
  transforms of x, 4x its size, and of w were kept alive until the backward) nor
  schedules those computations before dy exists. `lax.optimization_barrier` would say
  this, but XLA CPU removes barriers before both passes. The zero is 0 * (whether the
  element is finite), so a non-finite dy changes nothing."""
  first = lax.index_in_dim(dy.reshape(-1), 0, keepdims=False)
  zero = jnp.isfinite(first).astype(jnp.float32) * 0
  return [a + zero.astype(a.dtype) for a in arrays]


def _conv_tap_matmuls_bwd(strides, padding, dilation, residuals, dy):
  x, w = after(dy, *residuals)
  if output_window_grads_pay(x.shape, w.shape, strides, padding, dilation):
    if winograd_input_grad_pays(dy, w, strides, padding, dilation):
      dx = conv3x3_winograd(dy, w, _input_grad_padding(w.shape, padding, dilation), dilation,
                            flip_transpose=True)
      if winograd_pays(x, w, strides, padding, dilation):
        dw = conv3x3_winograd_filter_grad(x, dy, padding, dilation)
      else:
        _, dw = conv_grads_from_output_windows(x, w, dy, padding, dilation, input_grad=False)
      return dx.astype(x.dtype), dw.astype(w.dtype)
    return conv_grads_from_output_windows(x, w, dy, padding, dilation)
  if tuple(strides) == (1, 1) and tap_count(x.shape, w.shape, padding, dilation) > 1:
    return tap_matmul_grads(x, w, dy, padding, dilation)
  _, vjp = jax.vjp(lambda x_, w_: conv_as_tap_matmuls(x_, w_, strides, padding, dilation),
                   x, w)
  return vjp(dy)


def tap_count(x_shape, w_shape, padding, dilation) -> int:
  """The kernel taps of a stride-1 conv whose input window is not wholly padding."""
  out_h, out_w = (_conv_out_size(x_shape[1 + a], w_shape[a], 1, padding[a], dilation[a])
                  for a in range(2))
  return (len(_tap_windows(x_shape[1], out_h, w_shape[0], 1, padding[0][0], dilation[0]))
          * len(_tap_windows(x_shape[2], out_w, w_shape[1], 1, padding[1][0], dilation[1])))


def tap_matmul_grads(x: jax.Array, w: jax.Array, dy: jax.Array,
                     padding: tuple[tuple[int, int], ...],
                     dilation: tuple[int, int]) -> tuple[jax.Array, jax.Array]:
  """(dx, dw) of the stride-1 `conv_as_tap_matmuls`, tap after tap: tap (i, j) reads
  its window of x and of dy, dw[i, j] = window^T dy_window, and adds dy_window w[i, j]^T
  into its window of dx in place. Each tap waits for the previous one (`after`):
  autodiff of the forward instead kept every tap's window of x from the forward for the
  filter gradients (DeepLabV3-ResNet50's dilated ASPP convs, 2x320x320: 160 MB at the
  train step's peak). Same values as autodiff's to float rounding (float32 sums)."""
  batch, in_h, in_w, cin = x.shape
  kh, kw, _, cout = w.shape
  out_h, out_w = dy.shape[1:3]
  rows = _tap_windows(in_h, out_h, kh, 1, padding[0][0], dilation[0])
  cols = _tap_windows(in_w, out_w, kw, 1, padding[1][0], dilation[1])
  dx = jnp.zeros(x.shape, jnp.float32)
  dw = [[jnp.zeros((cin, cout), jnp.float32) for _ in range(kw)] for _ in range(kh)]
  for i, r_in, r0, r1 in rows:
    for j, c_in, c0, c1 in cols:
      xt, wt = after(dx, x, w[i, j])
      size = (batch, r1 - r0, c1 - c0)
      window = lax.dynamic_slice(xt, (0, r_in, c_in, 0), (*size, cin)).reshape(-1, cin)
      dy_window = dy[:, r0:r1, c0:c1].reshape(-1, cout)
      dw[i][j] = lax.dot_general(window, dy_window, (((0,), (0,)), ((), ())),
                                 preferred_element_type=jnp.float32)
      dx_window = lax.dot_general(dy_window, wt, (((1,), (1,)), ((), ())),
                                  preferred_element_type=jnp.float32).reshape(*size, cin)
      start = (0, r_in, c_in, 0)
      dx = lax.dynamic_update_slice(
          dx, lax.dynamic_slice(dx, start, dx_window.shape) + dx_window, start)
  return dx.astype(x.dtype), jnp.stack([jnp.stack(row) for row in dw]).astype(w.dtype)


# The gradients of a stride-1 kxk conv from the kh*kw shifted windows of its zero-padded
# output gradient, side by side ("im2col" of dy): the input gradient is one matmul of
# those windows by the flipped kernel, the filter gradient one matmul of x (read whole,
# not copied per tap) by them. In the FCN-ResNet50 train step (2x320x320, in-process
# A/Bs of 5 pairs each) this ran 1.21x as fast as per-tap matmuls over cropped windows of
# x and dy: 1.06x from reading x whole for the head's 2048->512 conv, 1.08x more for the
# backbone's 3x3s, 1.05x more from the two concatenated matmuls. The windows are built
# for this many bytes of them at a time (whole images per chunk, static batches only).
OUTPUT_WINDOWS_CHUNK_BYTES = 64 * 2**20


def output_window_grads_pay(x_shape, w_shape, strides, padding, dilation) -> bool:
  """Whether `conv_tap_matmuls`' backward is `conv_grads_from_output_windows`: stride-1
  kxk (not 1x1) convs with less than SPARSE_TAP_FRACTION of the products on padding (the
  windows span the whole input, so their zeros would be multiplied)."""
  return (tuple(strides) == (1, 1) and tuple(w_shape[:2]) != (1, 1)
          and padding_fraction(x_shape[1:3], w_shape[:2], strides, padding,
                               dilation) < SPARSE_TAP_FRACTION)


# The input gradient of a wide dense stride-1 3x3 conv is Winograd's F(2x2, 3x3) of dy
# with the flipped, transposed kernel (`conv3x3_winograd(flip_transpose=True)`), where
# `winograd_input_grad_pays`, and its filter gradient F(3x3, 2x2)
# (`conv3x3_winograd_filter_grad`) where the forward is Winograd's too; otherwise they
# come from dy's windows. Per op on 2x40x40 (idle, 2026-12-05), Winograd against the
# windows: input gradient 2048->512 135 vs 277 ms, 512->512 at dilation 4 40 vs 93 ms,
# 1024->256 45 vs 79 ms, 256->256 at dilation 2 9 vs 33 ms; filter gradient 184 vs 269,
# 46 vs 95, 57 vs 70, 11 vs 35 ms. FCN-ResNet50 train step (in-process A/Bs, 5 pairs):
# 1.11x from the input gradients, 1.10x more from the filter gradients.
def _input_grad_padding(w_shape, padding, dilation) -> tuple[tuple[int, int], ...]:
  """The padding of the input gradient's conv (dy by the flipped kernel, stride 1)."""
  return tuple(((k - 1) * d - lo, (k - 1) * d - hi)
               for k, d, (lo, hi) in zip(w_shape[:2], dilation, padding))


def winograd_input_grad_pays(dy, w, strides, padding, dilation) -> bool:
  """Whether `conv_tap_matmuls`' backward computes the input gradient by Winograd: for
  wide convs (Cin * Cout at least TAP_MATMUL_MIN_CHANNELS) whose input gradient's conv
  (stride 1, non-negative padding) is one `winograd_pays`."""
  pads = _input_grad_padding(w.shape, padding, dilation)
  if (tuple(strides) != (1, 1) or any(p < 0 for pair in pads for p in pair)
      or w.shape[2] * w.shape[3] < TAP_MATMUL_MIN_CHANNELS):
    return False
  flipped = jax.ShapeDtypeStruct(tuple(w.shape[:2]) + (w.shape[3], w.shape[2]), w.dtype)
  return winograd_pays(dy, flipped, (1, 1), pads, dilation)


def conv_grads_from_output_windows(x: jax.Array, w: jax.Array, dy: jax.Array,
                                   padding: tuple[tuple[int, int], ...],
                                   dilation: tuple[int, int], *, input_grad: bool = True
                                   ) -> tuple[jax.Array | None, jax.Array]:
  """(dx, dw) of the stride-1 NHWC x HWIO conv for output gradient dy (dx None when not
  `input_grad`).

  Input position q meets output q - s_t through tap t (offset s_t = tap * dilation -
  pad_lo per axis), so with dy zero-padded, window_t[q] = dy[q - s_t] and
  dx[q] = sum_t window_t[q] w_t^T, dw_t = sum_q x[q]^T window_t[q]: two matmuls over the
  windows concatenated along channels. f32 accumulation.
  """
  batch, height, width, cin = x.shape
  kh, kw, _, cout = w.shape
  out_h, out_w = dy.shape[1:3]
  pads = []
  for size, out, k, (pad_lo, _), d in ((height, out_h, kh, padding[0], dilation[0]),
                                        (width, out_w, kw, padding[1], dilation[1])):
    pads.append((max(0, (k - 1) * d - pad_lo), max(0, size + pad_lo - out)))
  dyp = jnp.pad(dy, ((0, 0), pads[0], pads[1], (0, 0)))
  starts = [(pads[0][0] + padding[0][0] - i * dilation[0],
             pads[1][0] + padding[1][0] - j * dilation[1]) for i in range(kh) for j in range(kw)]
  per_image = height * width * kh * kw * cout * jnp.dtype(dy.dtype).itemsize
  if _static_dims(batch):
    chunk = max(1, min(batch, OUTPUT_WINDOWS_CHUNK_BYTES // per_image))
    firsts = range(0, batch, chunk)
  else:
    chunk, firsts = batch, [0]
  dxs, dw = [], None
  for first in firsts:
    part = dyp if chunk == batch else dyp[first:first + chunk]
    xs = x if chunk == batch else x[first:first + chunk]
    cols = jnp.concatenate([lax.slice_in_dim(lax.slice_in_dim(part, r, r + height, axis=1),
                                             c, c + width, axis=2) for r, c in starts],
                           axis=-1).reshape(-1, kh * kw * cout)
    if input_grad:
      kernel_t = jnp.transpose(w, (0, 1, 3, 2)).reshape(kh * kw * cout, cin).astype(dy.dtype)
      dxs.append(jnp.dot(cols, kernel_t, preferred_element_type=jnp.float32
                         ).reshape(xs.shape).astype(x.dtype))
    part_dw = lax.dot_general(xs.reshape(-1, cin), cols, (((0,), (0,)), ((), ())),
                              preferred_element_type=jnp.float32)
    dw = part_dw if dw is None else dw + part_dw
  dw = jnp.transpose(dw.reshape(cin, kh, kw, cout), (1, 2, 0, 3)).astype(w.dtype)
  if not input_grad:
    return None, dw
  return (dxs[0] if len(dxs) == 1 else jnp.concatenate(dxs)), dw


conv_tap_matmuls.defvjp(_conv_tap_matmuls_fwd, _conv_tap_matmuls_bwd)


def _conv_general_dilated_via(op, lhs, rhs, window_strides, padding, lhs_dilation=None,
                              rhs_dilation=None, dimension_numbers=None,
                              feature_group_count=1, precision=None, **kwargs):
  """`lax.conv_general_dilated`'s signature computed by `op` (`conv_taps` or
  `conv_tap_matmuls`) where it applies (NHWC/HWIO, explicit non-negative padding, no
  input dilation or groups); otherwise the plain op."""
  rhs_dilation = tuple(rhs_dilation or (1,) * (lhs.ndim - 2))
  nhwc = lax.conv_dimension_numbers(lhs.shape, rhs.shape, _NHWC)
  plain = (lhs.ndim != 4 or isinstance(padding, str) or feature_group_count != 1 or kwargs
           or any(p < 0 for pair in padding for p in pair)
           or precision is not None or any(d != 1 for d in (lhs_dilation or (1, 1)))
           or (dimension_numbers is not None and
               lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers) != nhwc))
  if plain:
    return lax.conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation,
                                    rhs_dilation, dimension_numbers, feature_group_count,
                                    precision=precision, **kwargs)
  return op(lhs, rhs, tuple(int(s) for s in window_strides),
            tuple((int(a), int(b)) for a, b in padding), tuple(int(d) for d in rhs_dilation))


conv_general_dilated_taps = functools.partial(_conv_general_dilated_via, conv_taps)
conv_general_dilated_tap_matmuls = functools.partial(_conv_general_dilated_via,
                                                     _conv_tap_matmuls_where_they_pay)
conv_general_dilated_tap_matmuls_nested = functools.partial(
    _conv_general_dilated_via,
    functools.partial(_conv_tap_matmuls_where_they_pay, nested=True))


def conv2d(features: int, kernel_size: int | Sequence[int] = 3, *,
           strides: int | Sequence[int] = 1, dilation: int | Sequence[int] = 1,
           use_bias: bool = True, dtype: Dtype | None = None,
           kernel_init: Initializer = kaiming_normal_fan_out,
           name: str | None = None, weight_grad: str | None = None) -> nn.Conv:
  """A `nn.Conv` with PyTorch padding (`dilation * (k - 1) // 2` per side).

  `weight_grad`: how the conv is computed, one of CONV_WEIGHT_GRADS; None = the one set
  by `conv_weight_grad(...)` (default 'auto'). Parameters do not depend on it, outputs
  only by float rounding.
  """
  weight_grad = weight_grad or _CONV_WEIGHT_GRAD.get()
  if weight_grad not in CONV_WEIGHT_GRADS:
    raise ValueError(f'weight_grad={weight_grad!r} is not valid; choose one of '
                     f'{list(CONV_WEIGHT_GRADS)}')
  weight_grad = resolve_conv_weight_grad(weight_grad)
  if weight_grad == 'tap_matmuls':
    conv_op = conv_general_dilated_tap_matmuls
  elif weight_grad == 'tap_matmuls_nested':
    conv_op = conv_general_dilated_tap_matmuls_nested
  elif weight_grad == 'taps' or (weight_grad == 'taps_1x1' and _pair(kernel_size) == (1, 1)):
    conv_op = conv_general_dilated_taps
  else:
    conv_op = None
  return nn.Conv(
      features, _pair(kernel_size), strides=_pair(strides),
      padding=torch_padding(kernel_size, dilation),
      kernel_dilation=_pair(dilation), use_bias=use_bias, dtype=dtype,
      kernel_init=kernel_init, name=name,
      conv_general_dilated=conv_op)


def batch_norm(train: bool, *, axis_name: str | None = None,
               dtype: Dtype | None = None,
               scale_init: Initializer = nn.initializers.ones,
               name: str | None = None) -> BatchNorm:
  """BatchNorm with torchvision's momentum/eps; `axis_name` syncs stats under pmap."""
  return BatchNorm(
      use_running_average=not train, momentum=BN_MOMENTUM, epsilon=BN_EPSILON,
      axis_name=axis_name, dtype=dtype, scale_init=scale_init, name=name)


def _batch_stats(x: jax.Array, axis_name: str | None) -> tuple[jax.Array, jax.Array]:
  """Per-channel float32 (mean, biased variance) of NHWC-like `x` over all but its last
  axis (and over `axis_name`'s devices): flax's fast variance, E[x^2] - E[x]^2 clipped
  at 0, both means in one `pmean`."""
  x = x.astype(jnp.promote_types(x.dtype, jnp.float32))
  axes = tuple(range(x.ndim - 1))
  mean, mean2 = x.mean(axes), lax.square(x).mean(axes)
  if axis_name is not None:
    mean, mean2 = lax.pmean(jnp.stack([mean, mean2]), axis_name)
  return mean, jnp.maximum(0.0, mean2 - lax.square(mean))


def _normalize(x, mean, var, scale, bias, epsilon, dtype):
  return jnp.asarray((x - mean) * (scale * lax.rsqrt(var + epsilon)) + bias, dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def batch_norm_train(x: jax.Array, scale: jax.Array, bias: jax.Array, epsilon: float,
                     axis_name: str | None, dtype: Dtype
                     ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(y, mean, var): training-mode BatchNorm of `x` over all but its last axis with the
  batch's statistics (returned for the running averages; no gradient flows back through
  them), the same values as flax's `nn.BatchNorm`.

  Its gradient keeps only x (and the per-channel statistics) from the forward. Autodiff
  of the forward keeps x - mean as well (for the gradients of the scale and of the
  variance), one more activation-sized buffer per BatchNorm: 390 MB of the FCN-ResNet50
  train step's 1.7 GB of temporaries (2x320x320). The backward never forms x - mean
  (XLA's CSE would merge it with the forward's and keep it):
  dx = s r (dy - G_b / M - r^2 G_s (x - mean) / M) is applied as k1 dy + k2 x + k3 with
  per-channel k's, G_b = sum(dy), G_s = sum(dy x) - mean G_b, summed over `axis_name`'s
  devices as the forward's statistics are (M counts them all).
  """
  return _batch_norm_train_fwd(x, scale, bias, epsilon, axis_name, dtype)[0]


def _batch_norm_train_fwd(x, scale, bias, epsilon, axis_name, dtype):
  mean, var = _batch_stats(x, axis_name)
  y = _normalize(x, mean, var, scale, bias, epsilon, dtype)
  return (y, mean, var), (x, scale, mean, var)


def _batch_norm_train_bwd(epsilon, axis_name, dtype, residuals, cotangents):
  x, scale, mean, var = residuals
  dy = cotangents[0].astype(jnp.float32)
  x32 = x.astype(jnp.float32)
  axes = tuple(range(x.ndim - 1))
  local_b = dy.sum(axes)
  local_s = (dy * x32).sum(axes) - mean * local_b
  rstd = lax.rsqrt(var + epsilon)
  count = np.prod(x.shape[:-1])
  if axis_name is None:
    total_b, total_s = local_b, local_s
  else:
    total_b, total_s = lax.psum(jnp.stack([local_b, local_s]), axis_name)
    count = count * lax.psum(1, axis_name)
  k1 = scale * rstd
  k2 = -k1 * lax.square(rstd) * total_s / count
  k3 = -k2 * mean - k1 * total_b / count
  dx = (k1 * dy + k2 * x32 + k3).astype(x.dtype)
  return dx, (rstd * local_s).astype(scale.dtype), local_b.astype(scale.dtype)


batch_norm_train.defvjp(_batch_norm_train_fwd, _batch_norm_train_bwd)


class BatchNorm(nn.Module):
  """flax's `nn.BatchNorm` over the last axis (the same variables: params `scale`,
  `bias`; batch_stats `mean`, `var`; the same outputs and running averages), whose
  training-mode gradient is `batch_norm_train`'s."""
  use_running_average: bool
  momentum: float = BN_MOMENTUM
  epsilon: float = BN_EPSILON
  axis_name: str | None = None
  dtype: Dtype | None = None
  scale_init: Initializer = nn.initializers.ones

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    features = x.shape[-1]
    ra_mean = self.variable('batch_stats', 'mean', lambda: jnp.zeros(features, jnp.float32))
    ra_var = self.variable('batch_stats', 'var', lambda: jnp.ones(features, jnp.float32))
    scale = self.param('scale', self.scale_init, (features,), jnp.float32)
    bias = self.param('bias', nn.initializers.zeros, (features,), jnp.float32)
    dtype = jnp.result_type(x, scale) if self.dtype is None else self.dtype
    if self.use_running_average:
      return _normalize(x, ra_mean.value, ra_var.value, scale, bias, self.epsilon, dtype)
    initializing = self.is_initializing()
    y, mean, var = batch_norm_train(x, scale, bias, self.epsilon,
                                    None if initializing else self.axis_name, dtype)
    if not initializing:
      ra_mean.value = self.momentum * ra_mean.value + (1 - self.momentum) * mean
      ra_var.value = self.momentum * ra_var.value + (1 - self.momentum) * var
    return y


class ConvBN(nn.Module):
  """Conv (optionally atrous) -> optional BatchNorm -> optional ReLU.

  Children are named `conv` and `bn`: they map to index 0 and 1 of the
  equivalent torchvision `nn.Sequential(Conv2d, BatchNorm2d, ReLU)`.

  Attributes:
    features: output channels.
    kernel_size, strides, dilation: as in PyTorch; padding is PyTorch's.
    use_bn: add BatchNorm after the conv.
    use_bias: conv bias; None means "only when there is no BN".
    relu: apply ReLU at the end.
    bn_axis_name: pmap axis over which BatchNorm statistics are averaged.
  """
  features: int
  kernel_size: int | Sequence[int] = 3
  strides: int | Sequence[int] = 1
  dilation: int | Sequence[int] = 1
  use_bn: bool = True
  use_bias: bool | None = None
  relu: bool = True
  bn_axis_name: str | None = None
  dtype: Dtype | None = None
  kernel_init: Initializer = kaiming_normal_fan_out

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    use_bias = (not self.use_bn) if self.use_bias is None else self.use_bias
    x = conv2d(self.features, self.kernel_size, strides=self.strides,
               dilation=self.dilation, use_bias=use_bias, dtype=self.dtype,
               kernel_init=self.kernel_init, name='conv')(x)
    if self.use_bn:
      x = batch_norm(train, axis_name=self.bn_axis_name, dtype=self.dtype,
                     name='bn')(x)
    if self.relu:
      x = nn.relu(x)
    return x


# ---------------------------------------------------------------------------
# Bilinear interpolation, exactly as PyTorch's F.interpolate(mode='bilinear').


def _interp_matrix(in_size: int, out_size: int, align_corners: bool) -> np.ndarray:
  """[out_size, in_size] linear-interpolation weights of PyTorch's upsample_bilinear2d.

  PyTorch (aten/src/ATen/native/UpSample.h, area_pixel_compute_source_index):
    align_corners=True:  src = dst * (in - 1) / (out - 1)   (0 when out == 1)
    align_corners=False: src = max((dst + 0.5) * in / out - 0.5, 0)
  then i0 = floor(src), i1 = min(i0 + 1, in - 1), weights (1 - l, l), l = src - i0.
  There is no antialiasing when downsampling.
  """
  dst = np.arange(out_size, dtype=np.float64)
  if align_corners:
    scale = (in_size - 1) / (out_size - 1) if out_size > 1 else 0.0
    src = dst * scale
  else:
    src = np.maximum((dst + 0.5) * (in_size / out_size) - 0.5, 0.0)
  i0 = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
  i1 = np.minimum(i0 + 1, in_size - 1)
  lam = src - i0
  m = np.zeros((out_size, in_size), np.float64)
  rows = np.arange(out_size)
  np.add.at(m, (rows, i0), 1.0 - lam)
  np.add.at(m, (rows, i1), lam)
  return m


def bilinear_resize(x: jax.Array, size: Sequence[int], align_corners: bool) -> jax.Array:
  """Resizes x: [..., H, W, C] to [..., size[0], size[1], C].

  Matches `torch.nn.functional.interpolate(mode='bilinear', align_corners=...)`
  (NCHW there) exactly, up- and downsampling (no antialiasing), which
  `jax.image.resize` cannot do (no align_corners; antialiases on downsampling).
  Implemented as two static [out, in] interpolation matrices contracted with
  einsum, computed in float32 at HIGHEST precision; the result has x's dtype.
  """
  out_h, out_w = (int(s) for s in size)
  in_h, in_w = x.shape[-3], x.shape[-2]
  if (out_h, out_w) == (in_h, in_w):
    return x
  compute_dtype = jnp.promote_types(x.dtype, jnp.float32)
  mh = jnp.asarray(_interp_matrix(in_h, out_h, align_corners), compute_dtype)
  mw = jnp.asarray(_interp_matrix(in_w, out_w, align_corners), compute_dtype)
  hi = jax.lax.Precision.HIGHEST
  y = jnp.einsum('oh,...hwc->...owc', mh, x.astype(compute_dtype), precision=hi)
  y = jnp.einsum('pw,...owc->...opc', mw, y, precision=hi)
  return y.astype(x.dtype)


# ---------------------------------------------------------------------------
# Transposed convolution ("deconvolution") initialised to bilinear upsampling.


def bilinear_kernel_size(factor: int) -> int:
  """Kernel size of FCN's bilinear upsampling deconv: 2f - f % 2 (FCN §3.3, surgery.py)."""
  return 2 * factor - factor % 2


def bilinear_filter(size: int) -> np.ndarray:
  """[size, size] separable bilinear (tent) filter, FCN's `upsample_filt`."""
  factor = (size + 1) // 2
  center = factor - 1 if size % 2 == 1 else factor - 0.5
  og = np.arange(size, dtype=np.float64)
  f1 = 1.0 - np.abs(og - center) / factor
  return np.outer(f1, f1)


def bilinear_kernel(factor: int, channels: int) -> np.ndarray:
  """[k, k, channels, channels] deconv kernel upsampling each channel bilinearly.

  k = 2f - f % 2. Diagonal in the channel axes (channel c -> channel c only),
  zero elsewhere, like FCN's `surgery.interp`. Layout (kh, kw, in, out) in
  PyTorch's ConvTranspose orientation (see `conv_transpose_torch`).
  """
  k = bilinear_kernel_size(factor)
  filt = bilinear_filter(k).astype(np.float32)
  w = np.zeros((k, k, channels, channels), np.float32)
  idx = np.arange(channels)
  w[:, :, idx, idx] = filt[:, :, None]
  return w


def conv_transpose_torch(x: jax.Array, kernel: jax.Array, stride: int,
                         crop: int, *, depthwise: bool = False) -> jax.Array:
  """Transposed conv with PyTorch's ConvTranspose2d semantics and cropping.

  Full (uncropped) output, no flip (PyTorch / Caffe "deconvolution"):
    y_full[s*i + t] += x[i] * kernel[t]          (per spatial axis)
  of size (n - 1) * s + k; then `crop` pixels are removed from *each* side
  (PyTorch's `padding=crop`), giving (n - 1) * s + k - 2 * crop.

  This is NOT what `flax.linen.ConvTranspose` (`transpose_kernel=False`) computes:
  that one correlates the dilated input with the kernel, i.e. uses the spatially
  flipped kernel. Here the kernel is flipped before the lax call so that
  torchvision ConvTranspose2d weights w[in, out, kh, kw] import as
  `w.transpose(2, 3, 0, 1)` unchanged.

  Gradient: the input gradient is XLA's; the kernel gradient is one matmul per
  kernel tap, dkernel[t] = x^T @ dy_full[s*i + t] (`filter_grad_taps`), the same
  sums as `jax.grad` of the lax call in another order. XLA CPU computes the kernel
  gradient of this input-dilated conv ~40x slower (measured: Mask R-CNN's 2x2
  stride-2 conv5_mask on 128 RoIs of 14x14x256, 7.8 s vs 0.18 s).

  Args:
    x: [B, H, W, C_in].
    kernel: [k, k, C_in, C_out], or [k, k, 1, C] when depthwise.
    stride: upsampling factor s.
    crop: pixels removed on each side of the full output.
    depthwise: each channel upsampled on its own (feature_group_count=C).
  Returns:
    [B, (H-1)*s + k - 2*crop, (W-1)*s + k - 2*crop, C_out].
  """
  kernel = kernel.astype(x.dtype)
  if depthwise:  # only FCN's fixed bilinear kernel: no kernel gradient to speed up
    return _conv_transpose_lax(x, kernel, stride, crop, depthwise=True)
  return _conv_transpose(x, kernel, stride, crop)


def _conv_transpose_lax(x, kernel, stride, crop, depthwise=False):
  k = kernel.shape[0]
  pad = k - 1 - crop
  return jax.lax.conv_general_dilated(
      x, kernel[::-1, ::-1], window_strides=(1, 1),
      padding=((pad, pad), (pad, pad)), lhs_dilation=(stride, stride),
      dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
      feature_group_count=x.shape[-1] if depthwise else 1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _conv_transpose(x, kernel, stride, crop):
  return _conv_transpose_lax(x, kernel, stride, crop)


def _conv_transpose_fwd(x, kernel, stride, crop):
  return _conv_transpose_lax(x, kernel, stride, crop), (x, kernel)


def _conv_transpose_bwd(stride, crop, residuals, dy):
  x, kernel = residuals
  _, input_vjp = jax.vjp(lambda x_: _conv_transpose_lax(x_, kernel, stride, crop), x)
  (dx,) = input_vjp(dy)
  # Read backwards, y = x (*)^T kernel is a stride-s conv of dy (padded by `crop`) whose
  # output has x's grid: dkernel[t] = dy_full[s*i + t]^T @ x is that conv's filter
  # gradient with the channel axes swapped.
  k, _, c_in, c_out = kernel.shape
  dk = filter_grad_taps(dy, x, (k, k, c_out, c_in), (stride, stride), ((crop, crop),) * 2,
                        (1, 1))
  return dx, jnp.swapaxes(dk, 2, 3).astype(kernel.dtype)


_conv_transpose.defvjp(_conv_transpose_fwd, _conv_transpose_bwd)


class BilinearDeconv(nn.Module):
  """FCN's upsampling layer: stride-f transposed conv with bilinear init (FCN §3.3).

  Kernel 2f - f % 2, stride f, no bias. The full transposed-conv output is
  cropped by f // 2 on each side (PyTorch `padding=f // 2`), so [H, W] -> [f*H, f*W]
  and the output grid is aligned with the input's: output pixel o sits at input
  coordinate (o + 0.5) / f - 0.5 (PyTorch align_corners=False). This is FCN's
  deconv + "crop" layer without the padding=100 offset. Exact relationship
  (tested): with the bilinear init, output pixel o equals
  `bilinear_resize(x, (f*H, f*W), align_corners=False)` wherever its source
  coordinate lies in [0, H-1], i.e. for f // 2 <= o < f*H - f // 2 (odd f too).
  Proof: the kernel tap used is t = o + f//2 - f*i, and the FCN filter there is
  1 - |t - c| / f = 1 - |src(o) - i| with c its centre, the tent weight of
  bilinear interpolation. Nearer the border the deconv blends with the zero
  padding where bilinear_resize clamps to the edge pixel.

  Attributes:
    factor: upsampling factor f.
    learnable: if True, a [k, k, C, C] `kernel` param initialised to the
      per-channel bilinear filter (cross-channel weights start at zero and may
      learn); if False, no params: a constant depthwise bilinear filter (FCN's
      released nets fix these layers, `lr_mult: 0`).
  """
  factor: int
  learnable: bool = True

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    f = self.factor
    channels = x.shape[-1]
    if self.learnable:
      kernel = self.param(
          'kernel', lambda _, shape: jnp.asarray(bilinear_kernel(f, shape[-1])),
          (bilinear_kernel_size(f),) * 2 + (channels, channels))
      return conv_transpose_torch(x, kernel, f, f // 2)
    filt = bilinear_filter(bilinear_kernel_size(f)).astype(np.float32)
    kernel = jnp.asarray(np.broadcast_to(filt[:, :, None, None],
                                         filt.shape + (1, channels)))
    return conv_transpose_torch(x, kernel, f, f // 2, depthwise=True)


# ---------------------------------------------------------------------------
# Max pooling with argmax and max unpooling (SegNet / DeconvNet).


def _pool_pads(padding: str | Sequence[tuple[int, int]], size: tuple[int, int],
               window: tuple[int, int], stride: tuple[int, int]
               ) -> tuple[tuple[int, int], ...]:
  if isinstance(padding, str):
    if padding == 'VALID':
      return ((0, 0), (0, 0))
    if padding == 'SAME':
      pads = []
      for n, k, s in zip(size, window, stride):
        out = -(-n // s)
        total = max((out - 1) * s + k - n, 0)
        pads.append((total // 2, total - total // 2))
      return tuple(pads)
    raise ValueError(f"padding must be 'SAME', 'VALID' or pairs, got {padding!r}")
  return tuple((int(a), int(b)) for a, b in padding)


def max_pool(x: jax.Array, window: int | Sequence[int], strides: int | Sequence[int],
             padding: str | Sequence[tuple[int, int]] = 'VALID') -> jax.Array:
  """`nn.max_pool` of an NHWC map, the same values. Under 'tap_matmuls' (the CPU default
  of `conv_weight_grad`) and 'tap_matmuls_nested' its gradient is `_max_pool_grad`'s:
  XLA CPU differentiates `nn.max_pool` through a reduce_window that carries index maps
  (ReLU and ResNet's 3x3/2 stem pool on 2x160x160x64, forward and backward: 52 ms,
  against 5.5 ms)."""
  window, strides = _pair(window), _pair(strides)
  if x.ndim != 4 or current_conv_weight_grad() not in ('tap_matmuls', 'tap_matmuls_nested'):
    return nn.max_pool(x, window, strides=strides, padding=padding)
  return _max_pool(x, window, strides, _pool_pads(padding, x.shape[1:3], window, strides))


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
def _max_pool(x, window, strides, padding):
  return nn.max_pool(x, window, strides=strides, padding=padding)


def _max_pool_fwd(x, window, strides, padding):
  y = _max_pool(x, window, strides, padding)
  return y, (x, y)


def _max_pool_grad(window, strides, padding, residuals, dy):
  """Each output's gradient goes to the first input in row-major window order that
  equals its maximum (PyTorch's choice among ties; `nn.max_pool`'s gradient may pick
  another of equal inputs): per tap, a mask of the outputs it wins, scattered back to
  the tap's strided input positions by an interior-padded `lax.pad`."""
  x, y = residuals
  (kh, kw), (sh, sw), ((pt, pb), (pl, pr)) = window, strides, padding
  batch, height, width, channels = x.shape
  out_h, out_w = y.shape[1:3]
  padded_h, padded_w = height + pt + pb, width + pl + pr
  xp = jnp.pad(x, ((0, 0), (pt, pb), (pl, pr), (0, 0)), constant_values=-jnp.inf)
  zero = jnp.zeros((), dy.dtype)
  taken = jnp.zeros(y.shape, bool)
  dxp = None
  for i in range(kh):
    for j in range(kw):
      tap = lax.slice(xp, (0, i, j, 0),
                      (batch, i + sh * (out_h - 1) + 1, j + sw * (out_w - 1) + 1, channels),
                      (1, sh, sw, 1))
      wins = (tap == y) & ~taken
      taken = taken | wins
      part = lax.pad(jnp.where(wins, dy, zero), zero,
                     ((0, 0, 0), (i, padded_h - i - sh * (out_h - 1) - 1, sh - 1),
                      (j, padded_w - j - sw * (out_w - 1) - 1, sw - 1), (0, 0, 0)))
      dxp = part if dxp is None else dxp + part
  return (dxp[:, pt:pt + height, pl:pl + width],)


_max_pool.defvjp(_max_pool_fwd, _max_pool_grad)


def max_pool_with_argmax(x: jax.Array, window: int | Sequence[int],
                         stride: int | Sequence[int],
                         padding: str | Sequence[tuple[int, int]] = 'VALID'
                         ) -> tuple[jax.Array, jax.Array]:
  """Max pooling that also returns where each maximum came from.

  Args:
    x: [B, H, W, C].
    window, stride: pooling window and stride.
    padding: 'VALID', 'SAME' or ((top, bottom), (left, right)); padded
      positions hold -inf and are never selected.
  Returns:
    values: [B, Ho, Wo, C] (== nn.max_pool with the same arguments).
    indices: [B, Ho, Wo, C] int32 flat index h * W + w into the input's H x W
      plane of the same batch element and channel (PyTorch `return_indices`).
      Ties go to the first position in row-major window order.
  """
  kh, kw = _pair(window)
  sh, sw = _pair(stride)
  _, h, w, _ = x.shape
  (pt, pb), (pl, pr) = _pool_pads(padding, (h, w), (kh, kw), (sh, sw))
  xp = jnp.pad(x, ((0, 0), (pt, pb), (pl, pr), (0, 0)), constant_values=-jnp.inf)
  ho = (h + pt + pb - kh) // sh + 1
  wo = (w + pl + pr - kw) // sw + 1
  taps = [xp[:, di:di + sh * (ho - 1) + 1:sh, dj:dj + sw * (wo - 1) + 1:sw, :]
          for di in range(kh) for dj in range(kw)]
  stacked = jnp.stack(taps, axis=-1)  # [B, Ho, Wo, C, kh*kw]
  tap = jnp.argmax(stacked, axis=-1)
  values = jnp.take_along_axis(stacked, tap[..., None], axis=-1)[..., 0]
  row = (jnp.arange(ho) * sh - pt)[None, :, None, None] + tap // kw
  col = (jnp.arange(wo) * sw - pl)[None, None, :, None] + tap % kw
  return values, (row * w + col).astype(jnp.int32)


def max_unpool(values: jax.Array, indices: jax.Array,
               output_size: Sequence[int]) -> jax.Array:
  """Places `values` at `indices` in a zero [B, H, W, C] map (SegNet/DeconvNet unpooling).

  Args:
    values: [B, Ho, Wo, C].
    indices: [B, Ho, Wo, C] flat h * W + w indices from `max_pool_with_argmax`.
    output_size: (H, W) of the map that was pooled.
  Returns:
    [B, H, W, C]; gradients flow to `values`. Where overlapping windows record the
    same position, they carry the same value, so the write order does not matter.
  """
  h, w = (int(s) for s in output_size)
  b, _, _, c = values.shape
  flat_v = values.reshape(b, -1, c)
  flat_i = indices.reshape(b, -1, c)
  out = jnp.zeros((b, h * w, c), values.dtype)
  bi = jnp.arange(b)[:, None, None]
  ci = jnp.arange(c)[None, None, :]
  out = out.at[bi, flat_i, ci].set(flat_v)
  return out.reshape(b, h, w, c)


# Initialisers of the fully connected layers held as convolutions (VGG fc6/fc7, DeepLab
# v2 ASPP fc6/fc7). 'normal': N(0, 0.01), VGG's and torchvision's nn.Linear init, the
# papers' choice when fine-tuning from ImageNet weights. 'he': He et al. 2015 normal
# (fan in, ReLU gain), the usual choice from scratch. (On digit_scenes, 1,000 steps from
# scratch, the two gave the same result: experiments/README.md, DeepLab preset.)
FC_INITS = {
    'normal': nn.initializers.normal(0.01),
    'he': nn.initializers.he_normal(),
}
