"""Tests for segjax.models.layers: resize, bilinear deconv, pool/unpool, ConvBN."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from segjax.models import layers


def torch_bilinear_reference(x: np.ndarray, out_h: int, out_w: int,
                             align_corners: bool) -> np.ndarray:
  """PyTorch's CPU upsample_bilinear2d, pixel by pixel (x: [H, W, C], float64).

  From aten/src/ATen/native/UpSample.h: area_pixel_compute_scale /
  area_pixel_compute_source_index, then h1 = int(src), h1p = h1 < H - 1,
  out = (1 - l) * x[h1] + l * x[h1 + h1p].
  """
  in_h, in_w, _ = x.shape

  def scale(n_in, n_out):
    if align_corners:
      return (n_in - 1) / (n_out - 1) if n_out > 1 else 0.0
    return n_in / n_out

  def source(s, dst):
    if align_corners:
      return s * dst
    src = s * (dst + 0.5) - 0.5
    return 0.0 if src < 0 else src

  sh, sw = scale(in_h, out_h), scale(in_w, out_w)
  out = np.zeros((out_h, out_w, x.shape[2]))
  for oh in range(out_h):
    hr = source(sh, oh)
    h1 = int(hr)
    h1p = 1 if h1 < in_h - 1 else 0
    lh = hr - h1
    for ow in range(out_w):
      wr = source(sw, ow)
      w1 = int(wr)
      w1p = 1 if w1 < in_w - 1 else 0
      lw = wr - w1
      out[oh, ow] = ((1 - lh) * ((1 - lw) * x[h1, w1] + lw * x[h1, w1 + w1p])
                     + lh * ((1 - lw) * x[h1 + h1p, w1] + lw * x[h1 + h1p, w1 + w1p]))
  return out


@pytest.mark.parametrize('align_corners', [True, False])
@pytest.mark.parametrize('in_hw,out_hw', [
    ((5, 7), (13, 16)),   # up, non-integer ratios
    ((4, 4), (8, 8)),     # up x2
    ((13, 16), (5, 7)),   # down, non-integer
    ((16, 12), (4, 3)),   # down x4 (PyTorch does not antialias)
    ((6, 5), (1, 9)),     # degenerate output size 1
    ((1, 3), (4, 3)),     # input size 1
])
def test_bilinear_resize_matches_pytorch_formula(in_hw, out_hw, align_corners):
  x = np.random.default_rng(0).normal(size=(2,) + in_hw + (3,))
  got = layers.bilinear_resize(jnp.asarray(x, jnp.float32), out_hw, align_corners)
  assert got.shape == (2,) + out_hw + (3,)
  for b in range(2):
    want = torch_bilinear_reference(x[b], *out_hw, align_corners)
    np.testing.assert_allclose(np.asarray(got[b]), want, atol=1e-5, rtol=1e-5)


def test_bilinear_resize_upsampling_matches_jax_image_resize():
  # jax.image.resize uses the same half-pixel grid as align_corners=False and only
  # differs when downsampling (antialias) -- so upsampling must agree.
  x = jax.random.normal(jax.random.key(0), (2, 5, 7, 3))
  got = layers.bilinear_resize(x, (12, 15), align_corners=False)
  want = jax.image.resize(x, (2, 12, 15, 3), method='bilinear')
  np.testing.assert_allclose(got, want, atol=1e-5)


def test_bilinear_resize_keeps_dtype_and_identity():
  x = jax.random.normal(jax.random.key(0), (1, 4, 4, 2)).astype(jnp.bfloat16)
  assert layers.bilinear_resize(x, (8, 8), False).dtype == jnp.bfloat16
  assert layers.bilinear_resize(x, (4, 4), True) is x


def test_bilinear_kernel_is_fcn_upsample_filt():
  # FCN surgery.upsample_filt(4) for factor 2: outer([.25, .75, .75, .25]).
  k = layers.bilinear_kernel(2, 3)
  assert k.shape == (4, 4, 3, 3)
  row = np.array([0.25, 0.75, 0.75, 0.25])
  np.testing.assert_allclose(k[:, :, 1, 1], np.outer(row, row))
  np.testing.assert_array_equal(k[:, :, 0, 1], 0.0)  # no cross-channel weights
  # Odd factor 3: kernel 5, center 2, weights 1 - |t - 2| / 3.
  np.testing.assert_allclose(layers.bilinear_filter(5)[2], [1 / 3, 2 / 3, 1, 2 / 3, 1 / 3])
  assert [layers.bilinear_kernel_size(f) for f in (1, 2, 3, 8, 32)] == [1, 4, 5, 16, 64]


def numpy_conv_transpose(x: np.ndarray, w: np.ndarray, stride: int, crop: int) -> np.ndarray:
  """PyTorch ConvTranspose2d by definition: y[s*i + t] += x[i] w[t], then crop (x: [H, W, Cin])."""
  h, wd, _ = x.shape
  k = w.shape[0]
  full = np.zeros(((h - 1) * stride + k, (wd - 1) * stride + k, w.shape[3]))
  for i in range(h):
    for j in range(wd):
      full[i * stride:i * stride + k, j * stride:j * stride + k] += np.einsum(
          'c,abcd->abd', x[i, j], w)
  return full[crop:full.shape[0] - crop, crop:full.shape[1] - crop]


@pytest.mark.parametrize('stride,k,crop', [(2, 4, 1), (3, 5, 1), (2, 3, 0)])
def test_conv_transpose_torch_semantics_with_asymmetric_kernel(stride, k, crop):
  rng = np.random.default_rng(1)
  x = rng.normal(size=(1, 3, 4, 2))
  w = rng.normal(size=(k, k, 2, 3))  # asymmetric: a flip would be caught
  got = layers.conv_transpose_torch(jnp.asarray(x, jnp.float32), jnp.asarray(w, jnp.float32),
                                    stride, crop)
  np.testing.assert_allclose(got[0], numpy_conv_transpose(x[0], w, stride, crop),
                             atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize('stride,k,crop,depthwise', [
    (2, 2, 0, False),   # Mask R-CNN's conv5_mask
    (2, 4, 1, False),   # FCN's 2x deconvolution
    (3, 5, 1, False), (2, 3, 0, False), (8, 16, 4, False),
    (2, 4, 1, True), (4, 8, 2, True)])
def test_conv_transpose_torch_gradients_equal_those_of_the_plain_lax_conv(stride, k, crop,
                                                                          depthwise):
  # The kernel gradient is a custom per-tap matmul (layers.filter_grad_taps); both
  # gradients must equal jax.grad of the plain input-dilated lax convolution.
  rng = np.random.default_rng(k)
  x = jnp.asarray(rng.normal(size=(2, 5, 3, 4)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(k, k, 1 if depthwise else 4, 4 if depthwise else 6)),
                  jnp.float32)
  out_shape = layers.conv_transpose_torch(x, w, stride, crop, depthwise=depthwise).shape
  probe = jnp.asarray(rng.normal(size=out_shape), jnp.float32)  # a non-uniform cotangent

  def loss(fn):
    return lambda x, w: jnp.sum(probe * fn(x, w))
  got = jax.grad(loss(lambda x, w: layers.conv_transpose_torch(
      x, w, stride, crop, depthwise=depthwise)), argnums=(0, 1))(x, w)
  want = jax.grad(loss(lambda x, w: layers._conv_transpose_lax(  # pylint: disable=protected-access
      x, w, stride, crop, depthwise)), argnums=(0, 1))(x, w)
  for g, r in zip(got, want):
    assert g.shape == r.shape
    np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-4)
  assert float(jnp.max(jnp.abs(want[1]))) > 1.0  # not a vacuous comparison of zeros


@pytest.mark.parametrize('learnable', [True, False])
@pytest.mark.parametrize('factor', [2, 3, 4, 8])
def test_bilinear_deconv_equals_bilinear_resize_on_interior(factor, learnable):
  # Proven relationship (layers.BilinearDeconv docstring): identical wherever the
  # output pixel's source coordinate (o + .5) / f - .5 lies in [0, n - 1].
  h, w = 5, 4
  x = jax.random.normal(jax.random.key(factor), (2, h, w, 3))
  deconv = layers.BilinearDeconv(factor, learnable=learnable)
  variables = deconv.init(jax.random.key(0), x)
  assert bool(variables) == learnable
  y = deconv.apply(variables, x)
  assert y.shape == (2, factor * h, factor * w, 3)
  ref = layers.bilinear_resize(x, (factor * h, factor * w), align_corners=False)
  b = factor // 2
  np.testing.assert_allclose(y[:, b:factor * h - b, b:factor * w - b],
                             ref[:, b:factor * h - b, b:factor * w - b], atol=1e-5)
  # ... and not beyond: the border pixel blends with zero padding.
  assert not np.allclose(y[:, 0], ref[:, 0], atol=1e-3)


def test_bilinear_deconv_reproduces_a_linear_ramp():
  ramp = jnp.arange(6.0)[None, :, None, None] * jnp.ones((1, 6, 6, 1))
  y = layers.BilinearDeconv(4, learnable=False).apply({}, ramp)
  # Output pixel o sits at input coordinate (o + .5) / 4 - .5.
  want = (jnp.arange(24) + 0.5) / 4 - 0.5
  np.testing.assert_allclose(y[0, 2:-2, 5, 0], want[2:-2], atol=1e-5)


@pytest.mark.parametrize('learnable', [True, False])
def test_bilinear_deconv_does_not_mix_channels(learnable):
  x = jnp.zeros((1, 3, 3, 4)).at[:, :, :, 2].set(1.0)
  deconv = layers.BilinearDeconv(2, learnable=learnable)
  y = deconv.apply(deconv.init(jax.random.key(0), x), x)
  np.testing.assert_array_equal(y[..., [0, 1, 3]], 0.0)
  assert float(jnp.abs(y[..., 2]).sum()) > 0


def test_learnable_deconv_kernel_gets_gradient():
  x = jax.random.normal(jax.random.key(0), (1, 3, 3, 2))
  deconv = layers.BilinearDeconv(2, learnable=True)
  params = deconv.init(jax.random.key(0), x)
  assert params['params']['kernel'].shape == (4, 4, 2, 2)
  g = jax.grad(lambda p: jnp.sum(deconv.apply(p, x) ** 2))(params)
  assert float(jnp.abs(g['params']['kernel']).sum()) > 0


@pytest.mark.parametrize('window,stride,padding', [
    (2, 2, 'VALID'), (2, 2, 'SAME'), (3, 2, ((1, 1), (1, 1))), (3, 1, 'SAME')])
def test_max_pool_with_argmax(window, stride, padding):
  x = jax.random.normal(jax.random.key(0), (2, 7, 6, 3))
  values, idx = layers.max_pool_with_argmax(x, window, stride, padding)
  want = nn.max_pool(x, (window, window), (stride, stride), padding)
  np.testing.assert_array_equal(values, want)
  # The index points at the value it reports.
  flat = x.reshape(2, -1, 3)
  gathered = jnp.take_along_axis(flat, idx.reshape(2, -1, 3), axis=1).reshape(values.shape)
  np.testing.assert_array_equal(gathered, values)


_POOL_CASES = [(3, 2, ((1, 1), (1, 1)), 9, 8), (2, 2, 'SAME', 7, 6), (2, 2, 'VALID', 6, 7),
               (3, 1, ((1, 1), (1, 1)), 5, 6), (3, 2, ((0, 1), (1, 0)), 8, 9)]


@pytest.mark.parametrize('window,stride,padding,height,width', _POOL_CASES)
def test_max_pool_values_and_gradient_equal_nn_max_pool(window, stride, padding, height,
                                                        width):
  kx, kg = jax.random.split(jax.random.key(4))
  x = jax.random.normal(kx, (2, height, width, 3))  # no ties
  want_y = nn.max_pool(x, (window,) * 2, (stride,) * 2, padding)
  g = jax.random.normal(kg, want_y.shape)
  with layers.conv_weight_grad('tap_matmuls'):
    pool = lambda x_: layers.max_pool(x_, window, stride, padding)  # noqa: E731
    np.testing.assert_array_equal(pool(x), want_y)
    got = jax.jit(jax.grad(lambda x_: jnp.sum(pool(x_) * g)))(x)
    assert 'custom_vjp' in str(_primitives(pool, x))
  want = jax.grad(lambda x_: jnp.sum(nn.max_pool(x_, (window,) * 2, (stride,) * 2,
                                                 padding) * g))(x)
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
  with layers.conv_weight_grad('xla'):  # elsewhere: nn.max_pool itself
    assert 'custom_vjp' not in str(_primitives(
        lambda x_: layers.max_pool(x_, window, stride, padding), x))


def test_max_pool_gradient_goes_to_the_first_of_tied_inputs():
  # All-equal input (ReLU's zeros): each output's gradient goes to the first position of
  # its window in row-major order, as PyTorch's; 3x3/2 with padding 1 on 5x5.
  x = jnp.zeros((1, 5, 5, 1))
  with layers.conv_weight_grad('tap_matmuls'):
    got = jax.grad(lambda x_: jnp.sum(layers.max_pool(x_, 3, 2, ((1, 1), (1, 1)))))(x)
  want = np.zeros((5, 5))
  for r in range(3):
    for c in range(3):  # window rows/cols 2r-1..2r+1: first real one is max(0, 2r-1)
      want[max(0, 2 * r - 1), max(0, 2 * c - 1)] += 1
  np.testing.assert_array_equal(got[0, :, :, 0], want)


def test_unpool_inverts_pool_positions_and_passes_gradients():
  x = jax.random.normal(jax.random.key(0), (2, 8, 6, 3))
  values, idx = layers.max_pool_with_argmax(x, 2, 2)
  y = layers.max_unpool(values, idx, (8, 6))
  assert y.shape == x.shape
  mask = np.zeros((2, 48, 3), bool)
  np.put_along_axis(mask, np.asarray(idx).reshape(2, -1, 3), True, axis=1)
  mask = mask.reshape(x.shape)
  np.testing.assert_array_equal(np.asarray(y) != 0, mask)  # x has no exact zeros
  np.testing.assert_array_equal(np.asarray(y)[mask], np.asarray(x)[mask])
  assert mask.sum() == values.size  # one maximum per non-overlapping window
  # d/dx sum(w * unpool(pool(x))) = w at the argmax positions, 0 elsewhere.
  w = jax.random.normal(jax.random.key(1), x.shape)

  def f(x):
    v, i = layers.max_pool_with_argmax(x, 2, 2)
    return jnp.sum(w * layers.max_unpool(v, i, (8, 6)))

  np.testing.assert_allclose(jax.grad(f)(x), np.where(mask, w, 0.0))


def test_stride2_conv_samples_like_pytorch():
  # A one-hot centre tap with PyTorch padding 1 returns x[::2, ::2]; TF 'SAME'
  # would return x[1::2, 1::2] for even sizes.
  x = jax.random.normal(jax.random.key(0), (1, 8, 8, 1))
  conv = layers.conv2d(1, 3, strides=2, use_bias=False)
  kernel = jnp.zeros((3, 3, 1, 1)).at[1, 1].set(1.0)
  y = conv.apply({'params': {'kernel': kernel}}, x)
  np.testing.assert_array_equal(y, x[:, ::2, ::2])
  assert layers.torch_padding(3, 4) == ((4, 4), (4, 4))


def test_convbn_dilation_and_bn_momentum():
  x = jax.random.normal(jax.random.key(0), (4, 9, 9, 2)) * 3 + 1
  m = layers.ConvBN(5, 3, dilation=2)
  v = m.init(jax.random.key(0), x, train=False)
  assert 'bias' not in v['params']['conv']  # conv bias only without BN
  y, upd = m.apply(v, x, train=True, mutable=['batch_stats'])
  assert y.shape == (4, 9, 9, 5) and float(y.min()) >= 0
  # running = 0.9 * running + 0.1 * batch  (PyTorch momentum 0.1)
  z = nn.Conv(5, (3, 3), padding=((2, 2), (2, 2)), kernel_dilation=(2, 2),
              use_bias=False).apply({'params': v['params']['conv']}, x)
  np.testing.assert_allclose(upd['batch_stats']['bn']['mean'],
                             0.1 * z.mean(axis=(0, 1, 2)), rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(upd['batch_stats']['bn']['var'],
                             0.9 + 0.1 * z.var(axis=(0, 1, 2)), rtol=1e-4)


def test_convbn_bn_axis_name_averages_statistics_across_devices():
  # vmap with an axis name stands in for pmap: statistics over 2 "devices" of
  # 2 images each must equal those of one batch of 4.
  x = jax.random.normal(jax.random.key(0), (4, 6, 6, 3))
  synced = layers.ConvBN(4, bn_axis_name='devices')
  local = layers.ConvBN(4)
  v = local.init(jax.random.key(0), x, train=False)
  want, want_upd = local.apply(v, x, train=True, mutable=['batch_stats'])
  got, got_upd = jax.vmap(
      lambda xs: synced.apply(v, xs, train=True, mutable=['batch_stats']),
      axis_name='devices')(x.reshape(2, 2, 6, 6, 3))
  np.testing.assert_allclose(got.reshape(want.shape), want, atol=1e-5)
  np.testing.assert_allclose(got_upd['batch_stats']['bn']['mean'][0],
                             want_upd['batch_stats']['bn']['mean'], atol=1e-6)



def _batch_norm_case(module, x, axis_name):
  """(y, running-average update, gradients of a loss in params and x) of BatchNorm
  `module` in training mode; with `axis_name`, x's leading axis is 2 "devices" (vmap
  with an axis name stands in for pmap)."""
  variables = module.init(jax.random.key(0), x[:1] if axis_name else x)
  params = jax.tree.map(lambda p: p + jax.random.uniform(jax.random.key(1), p.shape),
                        variables['params'])
  target = jax.random.normal(jax.random.key(2), x.shape)

  def loss(params, x, target):
    y, upd = module.apply({'params': params, 'batch_stats': variables['batch_stats']}, x,
                          mutable=['batch_stats'])
    return jnp.sum(jnp.sin(y.astype(jnp.float32)) * target), (y, upd)

  value_and_grad = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)
  if axis_name:
    value_and_grad = jax.vmap(value_and_grad, in_axes=(None, 0, 0), axis_name=axis_name)
  (_, (y, upd)), grads = jax.jit(value_and_grad)(params, x, target)
  return y, upd, grads


@pytest.mark.parametrize('axis_name', [None, 'devices'])
@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
def test_batch_norm_values_statistics_and_gradients_equal_flax_batch_norm(axis_name, dtype):
  """layers.BatchNorm's hand-written gradient (it keeps only x) is autodiff's of flax's
  nn.BatchNorm, also with statistics over devices (the x gradient then sums over them)."""
  shape = (2, 3, 5, 6, 7) if axis_name else (6, 5, 6, 7)
  x = (jax.random.normal(jax.random.key(3), shape) * 2 + 0.7).astype(dtype)
  want = _batch_norm_case(nn.BatchNorm(use_running_average=False, momentum=layers.BN_MOMENTUM,
                                       epsilon=layers.BN_EPSILON, axis_name=axis_name,
                                       dtype=dtype), x, axis_name)
  got = _batch_norm_case(layers.batch_norm(True, axis_name=axis_name, dtype=dtype), x,
                         axis_name)
  assert got[0].dtype == want[0].dtype == dtype
  np.testing.assert_array_equal(np.asarray(got[0], np.float32), np.asarray(want[0], np.float32))
  jax.tree.map(np.testing.assert_array_equal, got[1], want[1])
  for g, w in zip(jax.tree.leaves(got[2]), jax.tree.leaves(want[2])):
    assert g.dtype == w.dtype
    g, w = np.asarray(g, np.float32), np.asarray(w, np.float32)
    tol = 1e-5 if dtype == jnp.float32 else 1e-2
    np.testing.assert_allclose(g, w, rtol=tol, atol=tol * np.abs(w).max())


def test_batch_norm_in_inference_mode_equals_flax_batch_norm():
  x = jax.random.normal(jax.random.key(4), (2, 5, 5, 3))
  variables = nn.BatchNorm(use_running_average=True).init(jax.random.key(0), x)
  variables = jax.tree.map(lambda v: v + jax.random.uniform(jax.random.key(5), v.shape),
                           variables)
  np.testing.assert_array_equal(
      layers.batch_norm(False).apply(variables, x),
      nn.BatchNorm(use_running_average=True, epsilon=layers.BN_EPSILON).apply(variables, x))


def _temp_bytes(fn, *args) -> int:
  return jax.jit(fn).lower(*args).compile().memory_analysis().temp_size_in_bytes


def test_batch_norm_gradient_keeps_one_buffer_per_layer_fewer_than_autodiff():
  """Autodiff of flax's BatchNorm keeps x and x - mean for the backward; ours keeps x:
  three stacked BatchNorm+ReLU layers need at least two activation-sized buffers less."""
  x = jax.random.normal(jax.random.key(6), (8, 32, 32, 64))
  size = x.size * 4

  def temp(module):
    variables = module.init(jax.random.key(0), x)

    def loss(params, x):
      for _ in range(3):
        x = nn.relu(module.apply({'params': params, 'batch_stats': variables['batch_stats']},
                                 x, mutable=['batch_stats'])[0]) * 1.5
      return jnp.sum(x * x)
    return _temp_bytes(jax.grad(loss, argnums=(0, 1)), variables['params'], x)

  flax_temp = temp(nn.BatchNorm(use_running_average=False))
  ours = temp(layers.batch_norm(True))
  assert ours <= flax_temp - 2 * size, (ours / size, flax_temp / size)


def test_after_keeps_values_and_stops_the_backward_keeping_winograd_transforms(monkeypatch):
  """`after` leaves its arrays' values; without it, XLA's CSE merges the filter
  gradient's Winograd transform of each layer's x with the forward's and keeps it (4x
  x) alive between them."""
  dy = jnp.arange(6.0).reshape(2, 3)
  x = jax.random.normal(jax.random.key(7), (4, 5))
  np.testing.assert_array_equal(layers.after(dy, x)[0], x)
  x = jax.random.normal(jax.random.key(8), (2, 16, 16, 256))
  ws = [jax.random.normal(jax.random.key(9 + i), (3, 3, 256, 256)) / 48.0 for i in range(3)]
  args = ((1, 1), ((1, 1), (1, 1)), (1, 1))
  assert layers.winograd_pays(x, ws[0], *args)

  def loss(x, ws):                                   # three conv + ReLU layers
    for w in ws:
      x = nn.relu(layers.conv_tap_matmuls(x, w, *args))
    return jnp.sum(jnp.tanh(x))

  ours = _temp_bytes(jax.grad(loss, argnums=(0, 1)), x, ws)
  monkeypatch.setattr(layers, 'after', lambda dy, *arrays: list(arrays))
  merged = _temp_bytes(jax.grad(loss, argnums=(0, 1)), x, ws)
  # Measured: 26.75 against 45 x-sized buffers.
  assert ours <= merged - 8 * x.size * 4, (ours / (x.size * 4), merged / (x.size * 4))

# (kernel, stride, dilation, input H, W): ResNet's 3x3 / 1x1 / strided / dilated convs,
# the 7x7/2 stem, an even kernel (padding after) and odd sizes at stride 2.
_TAPS_CASES = [(3, 1, 1, 9, 9), (1, 1, 1, 7, 6), (1, 2, 1, 9, 8), (3, 2, 1, 9, 10),
               (3, 1, 2, 11, 9), (3, 1, 4, 8, 8), (7, 2, 1, 13, 12), (2, 1, 1, 6, 7)]


def _conv_case(seed, kernel, stride, dilation, height, width):
  """x [2, H, W, 5], w [k, k, 5, 4], a cotangent g, the (strides, padding, dilation)
  args with PyTorch padding, and the plain XLA conv of them."""
  kx, kw, kg = jax.random.split(jax.random.key(seed), 3)
  x = jax.random.normal(kx, (2, height, width, 5))
  w = jax.random.normal(kw, (kernel, kernel, 5, 4))
  args = ((stride, stride), layers.torch_padding(kernel, dilation), (dilation, dilation))
  plain = lambda x_, w_: layers._conv_nhwc(x_, w_, *args)  # noqa: E731
  return x, w, jax.random.normal(kg, plain(x, w).shape), args, plain


@pytest.mark.parametrize('kernel,stride,dilation,height,width', _TAPS_CASES)
def test_conv_taps_gradients_equal_jax_grad_of_the_plain_conv(kernel, stride, dilation,
                                                              height, width):
  x, w, g, (strides, padding, dil), plain = _conv_case(1, kernel, stride, dilation,
                                                      height, width)
  taps = lambda x_, w_: layers.conv_taps(x_, w_, strides, padding, dil)  # noqa: E731
  np.testing.assert_array_equal(taps(x, w), plain(x, w))
  want = jax.grad(lambda x_, w_: jnp.sum(plain(x_, w_) * g), argnums=(0, 1))(x, w)
  got = jax.jit(jax.grad(lambda x_, w_: jnp.sum(taps(x_, w_) * g), argnums=(0, 1)))(x, w)
  np.testing.assert_array_equal(got[0], want[0])  # the input gradient is XLA's own
  np.testing.assert_allclose(got[1], want[1], rtol=1e-5, atol=1e-4)


# (kernel, stride, dilation, input H, W) beyond _TAPS_CASES: ASPP's dilations on maps
# smaller than the dilation (off-centre taps partly or wholly in the padding).
_SPARSE_CASES = [(3, 1, 6, 10, 9), (3, 1, 12, 10, 10), (3, 1, 5, 13, 7)]


@pytest.mark.parametrize('kernel,stride,dilation,height,width', _TAPS_CASES + _SPARSE_CASES)
def test_conv_tap_matmuls_value_and_gradients_equal_the_plain_conv(kernel, stride, dilation,
                                                                   height, width):
  x, w, g, (strides, padding, dil), plain = _conv_case(3, kernel, stride, dilation,
                                                      height, width)
  ours = lambda x_, w_: layers.conv_tap_matmuls(x_, w_, strides, padding, dil)  # noqa: E731
  np.testing.assert_allclose(jax.jit(ours)(x, w), plain(x, w), rtol=1e-5, atol=1e-4)
  np.testing.assert_allclose(layers.conv_as_tap_matmuls(x, w, strides, padding, dil),
                             plain(x, w), rtol=1e-5, atol=1e-4)
  want = jax.grad(lambda x_, w_: jnp.sum(plain(x_, w_) * g), argnums=(0, 1))(x, w)
  got = jax.jit(jax.grad(lambda x_, w_: jnp.sum(ours(x_, w_) * g), argnums=(0, 1)))(x, w)
  np.testing.assert_allclose(got[0], want[0], rtol=1e-5, atol=1e-4)
  np.testing.assert_allclose(got[1], want[1], rtol=1e-5, atol=1e-4)


# (kernel, input H, W, dilation (dh, dw), padding): 'same' convs, unequal dilations and
# paddings, padding on one side only, no padding (output smaller than the input), an
# even kernel, a 5x5.
_OUTPUT_WINDOW_CASES = [(3, 9, 9, (1, 1), ((1, 1), (1, 1))),
                        (3, 11, 8, (2, 3), ((2, 2), (3, 3))),
                        (3, 10, 9, (1, 2), ((0, 2), (3, 1))),
                        (3, 7, 9, (1, 1), ((0, 0), (0, 0))),
                        (2, 8, 7, (1, 1), ((0, 1), (0, 1))),
                        (5, 9, 10, (1, 1), ((2, 2), (2, 2)))]


@pytest.mark.parametrize('kernel,height,width,dilation,padding', _OUTPUT_WINDOW_CASES)
@pytest.mark.parametrize('chunk_bytes', [None, 1])
def test_conv_grads_from_output_windows_equal_the_plain_conv(kernel, height, width, dilation,
                                                             padding, chunk_bytes,
                                                             monkeypatch):
  if chunk_bytes:  # one image per chunk
    monkeypatch.setattr(layers, 'OUTPUT_WINDOWS_CHUNK_BYTES', chunk_bytes)
  kx, kw, kg = jax.random.split(jax.random.key(11), 3)
  x = jax.random.normal(kx, (2, height, width, 5))
  w = jax.random.normal(kw, (kernel, kernel, 5, 4))
  plain = lambda x_, w_: layers._conv_nhwc(x_, w_, (1, 1), padding, dilation)  # noqa: E731
  y, vjp = jax.vjp(plain, x, w)
  g = jax.random.normal(kg, y.shape)
  want = vjp(g)
  grads = jax.jit(lambda x_, w_, g_: layers.conv_grads_from_output_windows(
      x_, w_, g_, padding, dilation))
  got = grads(x, w, g)
  np.testing.assert_allclose(got[0], want[0], rtol=1e-5, atol=1e-4)
  np.testing.assert_allclose(got[1], want[1], rtol=1e-5, atol=1e-4)
  hlo = grads.lower(x, w, g).as_text()
  assert 'stablehlo.convolution' not in hlo
  assert hlo.count('stablehlo.dot_general') == (4 if chunk_bytes else 2)  # dx, dw per chunk


def test_output_window_grads_for_stride_1_kxk_convs_that_are_mostly_real():
  pays = lambda k=3, s=1, d=1, size=40: layers.output_window_grads_pay(  # noqa: E731
      (2, size, size, 512), (k, k, 512, 512), (s, s), layers.torch_padding(k, d), (d, d))
  assert pays()                  # FCN's head, ResNet's dilated 3x3s
  assert pays(d=4)               # 3x3 dilation 4 on 40x40: 0.13 padding
  assert not pays(d=12)          # ASPP on 40x40: 0.36 padding, cropped tap matmuls
  assert not pays(k=1)           # one matmul already
  assert not pays(s=2)           # strided
  x = jnp.ones((2, 12, 12, 256))
  w = jnp.ones((3, 3, 256, 256))
  args = ((1, 1), layers.torch_padding(3, 1), (1, 1))
  ours = lambda x_, w_: layers.conv_tap_matmuls(x_, w_, *args)  # noqa: E731
  forward = jax.jit(ours).lower(x, w).as_text()  # Winograd's matmuls
  hlo = jax.jit(jax.grad(lambda x_, w_: jnp.sum(ours(x_, w_) ** 2),
                         argnums=(0, 1))).lower(x, w).as_text()
  # The same forward, then both gradients by Winograd (16 matmuls each, not one per tap
  # and no windows of dy); no conv.
  assert 'stablehlo.convolution' not in hlo
  assert layers.winograd_input_grad_pays(x, w, *args)
  assert (hlo.count('stablehlo.dot_general')
          == forward.count('stablehlo.dot_general') + 16 + 16)
  # A wide 3x3 whose input gradient's conv would need negative padding (padding 3 at
  # dilation 1) keeps both gradients from dy's windows: two matmuls.
  crop = ((1, 1), ((3, 3), (3, 3)), (1, 1))
  x = jnp.ones((1, 40, 40, 256))
  assert layers.output_window_grads_pay(x.shape, w.shape, *crop)
  assert not layers.winograd_input_grad_pays(jnp.ones((1, 44, 44, 256)), w, *crop)
  cropped = lambda x_, w_: layers.conv_tap_matmuls(x_, w_, *crop)  # noqa: E731
  forward = jax.jit(cropped).lower(x, w).as_text()
  hlo = jax.jit(jax.grad(lambda x_, w_: jnp.sum(cropped(x_, w_) ** 2),
                         argnums=(0, 1))).lower(x, w).as_text()
  assert (hlo.count('stablehlo.dot_general')
          == forward.count('stablehlo.dot_general') + 2)


# (kernel, dilation, input H, W, rows per block): blocks that divide the rows or not,
# one row per block, one block, dilated halos, an even kernel (padding after).
_BLOCK_CASES = [(3, 1, 12, 9, 4), (3, 1, 11, 7, 3), (3, 1, 9, 8, 1), (3, 1, 6, 5, 6),
                (3, 2, 13, 10, 5), (5, 1, 10, 9, 4), (2, 1, 9, 7, 2)]


@pytest.mark.parametrize('kernel,dilation,height,width,rows', _BLOCK_CASES)
def test_conv_blocked_filter_grad_equals_the_plain_conv(kernel, dilation, height, width,
                                                        rows):
  x, w, g, (strides, padding, dil), plain = _conv_case(5, kernel, 1, dilation, height, width)
  ours = lambda x_, w_: layers.conv_blocked_filter_grad(  # noqa: E731
      x_, w_, padding, dil, rows)
  np.testing.assert_array_equal(jax.jit(ours)(x, w), plain(x, w))  # XLA's forward
  want = jax.grad(lambda x_, w_: jnp.sum(plain(x_, w_) * g), argnums=(0, 1))(x, w)
  got = jax.jit(jax.grad(lambda x_, w_: jnp.sum(ours(x_, w_) * g), argnums=(0, 1)))(x, w)
  np.testing.assert_array_equal(got[0], want[0])  # the input gradient is XLA's own
  np.testing.assert_allclose(got[1], want[1], rtol=1e-5, atol=1e-4)
  blocks = -(-plain(x, w).shape[1] // rows)
  hlo = jax.jit(jax.grad(lambda w_: jnp.sum(ours(x, w_) * g))).lower(w).as_text()
  assert hlo.count('stablehlo.convolution') == blocks  # one filter-gradient conv per block


# (kernel, dilation, input H, W): fc6-like 7x7 on a map smaller than the kernel, an even
# dilated kernel (padding after), a 5x5 with dilation 3.
_IM2COL_CASES = [(7, 1, 5, 4), (4, 2, 9, 8), (5, 3, 11, 12)]


@pytest.mark.parametrize('kernel,dilation,height,width', _IM2COL_CASES)
@pytest.mark.parametrize('chunk_bytes', [None, 1])
def test_conv_im2col_value_and_gradients_equal_the_plain_conv(kernel, dilation, height,
                                                              width, chunk_bytes,
                                                              monkeypatch):
  if chunk_bytes:  # one image per chunk
    monkeypatch.setattr(layers, 'IM2COL_CHUNK_BYTES', chunk_bytes)
  x, w, g, (_, padding, dil), plain = _conv_case(7, kernel, 1, dilation, height, width)
  ours = lambda x_, w_: layers.conv_im2col(x_, w_, padding, dil)  # noqa: E731
  np.testing.assert_allclose(jax.jit(ours)(x, w), plain(x, w), rtol=1e-5, atol=1e-4)
  want = jax.grad(lambda x_, w_: jnp.sum(plain(x_, w_) * g), argnums=(0, 1))(x, w)
  got = jax.jit(jax.grad(lambda x_, w_: jnp.sum(ours(x_, w_) * g), argnums=(0, 1)))(x, w)
  np.testing.assert_allclose(got[0], want[0], rtol=1e-5, atol=1e-4)
  np.testing.assert_allclose(got[1], want[1], rtol=1e-5, atol=1e-4)
  hlo = jax.jit(ours).lower(x, w).as_text()
  assert 'stablehlo.convolution' not in hlo
  assert hlo.count('stablehlo.dot_general') == (2 if chunk_bytes else 1)


def test_im2col_only_for_wide_convs_with_large_kernels():
  pays = lambda k, cin, cout, s=1, d=1, size=10: layers.im2col_pays(  # noqa: E731
      (2, size, size, cin), (k, k, cin, cout), (s, s), layers.torch_padding(k, d), (d, d))
  assert pays(7, 512, 4096)            # FCN's fc6
  assert pays(4, 512, 4096, d=4, size=40)  # DeepLab v1's fc6
  assert not pays(7, 128, 1024, d=4, size=6)  # mostly padding: tap matmuls skip it
  assert not pays(3, 512, 512)         # 3x3: XLA / tap matmuls / row blocks
  assert not pays(7, 3, 64)            # the ResNet stem: narrow
  assert not pays(7, 512, 4096, s=2)   # strided
  batch = jax.export.symbolic_shape('b')[0]  # jax.export with a symbolic batch
  assert not layers.im2col_pays((batch, 10, 10, 512), (7, 7, 512, 4096), (1, 1),
                                layers.torch_padding(7, 1), (1, 1))
  x = jnp.ones((1, 5, 5, 256))
  with layers.conv_weight_grad('tap_matmuls'):
    prims = _primitives(lambda x_: layers.conv2d(256, 7).init_with_output(
        jax.random.key(0), x_)[0], x)
  assert 'conv_general_dilated' not in prims and 'dot_general' in prims


def test_blocked_filter_grad_only_on_large_maps_of_a_batch():
  rows = lambda x_shape, k=3, cin=64, s=1, d=1: layers.blocked_filter_grad_rows(  # noqa: E731
      x_shape, (k, k, cin, 64), (s, s), layers.torch_padding(k, d), (d, d))
  assert rows((2, 320, 320, 64)) == 6              # 4096 positions: 2 x 6 x 320
  assert rows((2, 160, 160, 128), cin=128) == 12
  assert rows((2, 1024, 1024, 64)) == 16           # at most 64 blocks (unrolled)
  assert rows((2, 80, 80, 64)) is None             # small map: XLA's filter gradient
  assert rows((1, 320, 320, 64)) is None           # batch of one
  assert rows((2, 320, 320, 64), s=2) is None      # strided
  assert rows((2, 320, 320, 64), k=1) is None      # 1x1: one matmul (tap matmuls)
  assert layers.filter_grad_rows(2, (160, 160), (1, 1)) == 12
  assert rows((jax.export.symbolic_shape('b')[0], 320, 320, 64)) is None  # symbolic batch
  x = jnp.ones((2, 160, 160, 4))
  with layers.conv_weight_grad('tap_matmuls'):
    conv = layers.conv2d(4, 3)
    variables = conv.init(jax.random.key(0), x)
    hlo = jax.jit(jax.grad(lambda v: jnp.sum(conv.apply(v, x)))).lower(variables).as_text()
  # One filter-gradient conv per block; no forward or input gradient (x is a constant).
  assert hlo.count('stablehlo.convolution') == -(-160 // 12)


def test_padding_fraction_by_hand():
  # 3x3, dilation 36 on 40 rows: the off-centre taps reach 4 of the 40 rows each, so
  # (4 + 40 + 4) / 120 = 0.4 of a row's products are real; 1 - 0.4^2 = 0.84 pad.
  assert layers.padding_fraction((40, 40), (3, 3), (1, 1), ((36, 36), (36, 36)),
                                 (36, 36)) == pytest.approx(0.84)
  # dilation 1: each off-centre tap misses one row of 40.
  assert layers.padding_fraction((40, 40), (3, 3), (1, 1), ((1, 1), (1, 1)),
                                 (1, 1)) == pytest.approx(1 - (118 / 120) ** 2)
  assert layers.padding_fraction((7, 5), (1, 1), (2, 2), ((0, 0), (0, 0)), (1, 1)) == 0.0


def test_conv_tap_matmuls_where_every_tap_is_in_the_padding_gives_zeros():
  # 2x2 kernel, dilation 2, 1 pixel of padding on a 1x1 input: the one output reads
  # input rows -1 and 1 only.
  x = jnp.ones((1, 1, 1, 3))
  w = jnp.ones((2, 2, 3, 2))
  args = ((1, 1), ((1, 1), (1, 1)), (2, 2))
  want = layers._conv_nhwc(x, w, *args)
  assert want.shape == (1, 1, 1, 2)
  np.testing.assert_array_equal(layers.conv_as_tap_matmuls(x, w, *args), want)
  np.testing.assert_array_equal(want, 0.0)
  grads = jax.grad(lambda x_, w_: jnp.sum(layers.conv_tap_matmuls(x_, w_, *args)),
                   argnums=(0, 1))(x, w)
  assert [g.shape for g in grads] == [x.shape, w.shape]
  for g in grads:
    np.testing.assert_array_equal(g, 0.0)


def _primitives(fn, *args) -> set[str]:
  """The primitives of fn's jaxpr, including those inside nested jaxprs (custom_vjp)."""
  names = set()
  pending = list(jax.make_jaxpr(fn)(*args).jaxpr.eqns)
  while pending:
    eqn = pending.pop()
    names.add(str(eqn.primitive))
    for sub in jax.extend.core.jaxprs_in_params(eqn.params):
      pending.extend(sub.eqns)
  return names


@pytest.mark.parametrize('dilation,forward_conv', [(1, True), (12, False)])
def test_conv_tap_matmuls_uses_xla_conv_only_for_a_dense_forward(dilation, forward_conv):
  """Forward: XLA's conv unless >= SPARSE_TAP_FRACTION of it would be padding
  (dilation 12 on 16x16: 1 - (40/48)^2 = 0.31); the gradients never use it."""
  x = jnp.ones((1, 16, 16, 4))
  w = jnp.ones((3, 3, 4, 4))
  args = ((1, 1), layers.torch_padding(3, dilation), (dilation, dilation))
  fwd = _primitives(lambda x_, w_: layers.conv_tap_matmuls(x_, w_, *args), x, w)
  assert ('conv_general_dilated' in fwd) is forward_conv
  grad = jax.grad(lambda x_, w_: jnp.sum(layers.conv_tap_matmuls(x_, w_, *args) ** 2),
                  argnums=(0, 1))
  hlo = jax.jit(grad).lower(x, w).as_text()
  assert hlo.count('convolution') == int(forward_conv)  # the forward's, if any
  assert 'dot_general' in hlo


# (input H, W, dilation (dh, dw), padding): 'same' convs, maps that are not a multiple
# of the 2d-output tile, unequal dilations and paddings, no padding, and an output
# smaller than one tile.
_WINOGRAD_CASES = [(9, 9, (1, 1), ((1, 1), (1, 1))), (11, 7, (2, 2), ((2, 2), (2, 2))),
                   (10, 13, (3, 1), ((3, 3), (0, 2))), (8, 8, (4, 4), ((4, 4), (4, 4))),
                   (6, 7, (1, 2), ((0, 0), (0, 0))), (3, 4, (1, 1), ((0, 0), (0, 0)))]


@pytest.mark.parametrize('height,width,dilation,padding', _WINOGRAD_CASES)
def test_conv3x3_winograd_equals_the_plain_conv(height, width, dilation, padding):
  kx, kw = jax.random.split(jax.random.key(5))
  x = jax.random.normal(kx, (2, height, width, 6))
  w = jax.random.normal(kw, (3, 3, 6, 5))
  want = layers._conv_nhwc(x, w, (1, 1), padding, dilation)
  got = jax.jit(lambda x_, w_: layers.conv3x3_winograd(x_, w_, padding, dilation))(x, w)
  assert got.shape == want.shape
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * float(jnp.max(jnp.abs(want))))


@pytest.mark.parametrize('height,width,dilation,padding', _WINOGRAD_CASES)
@pytest.mark.parametrize('chunk_bytes', [None, 1])
def test_winograd_gradients_are_the_plain_convs(height, width, dilation, padding,
                                                chunk_bytes, monkeypatch):
  """flip_transpose=True on dy is the plain conv's input gradient and F(3x3, 2x2) its
  filter gradient (also with the channels in chunks of one)."""
  kx, kw, ky = jax.random.split(jax.random.key(11), 3)
  x = jax.random.normal(kx, (2, height, width, 5))
  w = jax.random.normal(kw, (3, 3, 5, 6))
  plain = lambda x_, w_: layers._conv_nhwc(x_, w_, (1, 1), padding, dilation)  # noqa: E731
  y, vjp = jax.vjp(plain, x, w)
  dy = jax.random.normal(ky, y.shape)
  want_dx, want_dw = vjp(dy)
  if chunk_bytes is not None:
    monkeypatch.setattr(layers, 'WINOGRAD_CHUNK_BYTES', chunk_bytes)
  pads = layers._input_grad_padding(w.shape, padding, dilation)
  got_dx = jax.jit(lambda w_, dy_: layers.conv3x3_winograd(dy_, w_, pads, dilation,
                                                           flip_transpose=True))(w, dy)
  got_dw = jax.jit(lambda x_, dy_: layers.conv3x3_winograd_filter_grad(
      x_, dy_, padding, dilation))(x, dy)
  for got, want in ((got_dx, want_dx), (got_dw, want_dw)):
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-5,
                               atol=1e-5 * float(jnp.max(jnp.abs(want))))


def test_winograd_input_grad_pays_where_the_input_gradients_conv_is_wide_and_dense():
  dy = jnp.ones((2, 40, 40, 256))
  same = ((1, 1), ((1, 1), (1, 1)), (1, 1))
  assert layers.winograd_input_grad_pays(dy, jnp.ones((3, 3, 512, 256)), *same)
  assert not layers.winograd_input_grad_pays(dy, jnp.ones((3, 3, 64, 256)), *same)  # narrow
  assert not layers.winograd_input_grad_pays(dy, jnp.ones((3, 3, 256, 256)), (2, 2),
                                             ((1, 1), (1, 1)), (1, 1))         # strided
  # Padding beyond the kernel's reach: the input gradient's conv would crop (negative pad).
  assert not layers.winograd_input_grad_pays(dy, jnp.ones((3, 3, 256, 256)), (1, 1),
                                             ((3, 3), (3, 3)), (1, 1))
  assert not layers.winograd_input_grad_pays(dy, jnp.ones((3, 3, 256, 256)), (1, 1),
                                             ((24, 24), (24, 24)), (24, 24))  # mostly padding


def test_conv3x3_winograd_in_channel_chunks_equals_one_chunk(monkeypatch):
  # 16 * 2 * 5 * 5 tiles * 4 bytes = 3200 bytes per input channel.
  assert layers._winograd_channel_chunk(2 * 5 * 5, 12) == 12
  # FCN-ResNet50's head, 2x40x40 (800 tiles): 32 MB hold 655 channels, so 512 of 2048.
  assert layers._winograd_channel_chunk(800, 2048) == 512
  x = jax.random.normal(jax.random.key(6), (2, 10, 10, 12))
  w = jax.random.normal(jax.random.key(7), (3, 3, 12, 4))
  padding = ((1, 1), (1, 1))
  whole = layers.conv3x3_winograd(x, w, padding, (1, 1))
  monkeypatch.setattr(layers, 'WINOGRAD_CHUNK_BYTES', 5 * 3200)
  assert layers._winograd_channel_chunk(2 * 5 * 5, 12) == 4     # 4 divides 12; 5 does not
  chunked = layers.conv3x3_winograd(x, w, padding, (1, 1))
  np.testing.assert_allclose(chunked, whole, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(chunked, layers._conv_nhwc(x, w, (1, 1), padding, (1, 1)),
                             rtol=1e-5, atol=1e-4)


def test_winograd_computes_wide_dense_3x3_forward_also_under_grad():
  """The forward of a wide dense 3x3 conv is Winograd's (no XLA conv), also under
  jax.grad, so are both its gradients, and they are the plain conv's."""
  x = jax.random.normal(jax.random.key(8), (1, 8, 8, 256))
  w = jax.random.normal(jax.random.key(9), (3, 3, 256, 256)) / 48.0
  args = ((1, 1), ((1, 1), (1, 1)), (1, 1))
  assert layers.winograd_pays(x, w, *args)
  ours = lambda x_, w_: layers.conv_tap_matmuls(x_, w_, *args)  # noqa: E731
  plain = lambda x_, w_: layers._conv_nhwc(x_, w_, *args)  # noqa: E731
  assert 'conv_general_dilated' not in _primitives(ours, x, w)
  np.testing.assert_allclose(jax.jit(ours)(x, w), plain(x, w), rtol=1e-5, atol=1e-4)
  loss = lambda f: lambda x_, w_: jnp.sum(f(x_, w_) ** 2)  # noqa: E731
  hlo = jax.jit(jax.grad(loss(ours), argnums=(0, 1))).lower(x, w).as_text()
  assert 'convolution' not in hlo
  # 16 Winograd tap matmuls forward, 16 for the input gradient, 16 for the filter gradient.
  assert layers.winograd_input_grad_pays(x, w, *args)
  assert hlo.count('dot_general') == 48
  got = jax.jit(jax.grad(loss(ours), argnums=(0, 1)))(x, w)
  want = jax.grad(loss(plain), argnums=(0, 1))(x, w)
  for a, b in zip(got, want):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-3)


def test_winograd_pays_only_for_wide_dense_stride_1_float32_3x3_convs():
  x = jnp.ones((2, 40, 40, 256))
  same = ((1, 1), ((1, 1), (1, 1)), (1, 1))
  assert layers.winograd_pays(x, jnp.ones((3, 3, 256, 256)), *same)
  # Narrower: from 64 x 64 channels, on at most WINOGRAD_NARROW_MAX_TILES 2x2 tiles.
  assert layers.winograd_pays(x, jnp.ones((3, 3, 256, 128)), *same)         # 800 tiles
  assert not layers.winograd_pays(x, jnp.ones((3, 3, 256, 8)), *same)       # too narrow
  big = jax.ShapeDtypeStruct((2, 160, 160, 64), jnp.float32)                # 12800 tiles
  assert not layers.winograd_pays(big, jnp.ones((3, 3, 64, 64)), *same)
  assert layers.winograd_pays(big, jnp.ones((3, 3, 256, 256)), *same)       # wide: any map
  edge = jax.ShapeDtypeStruct((2, 80, 80, 64), jnp.float32)                 # 3200 tiles
  assert layers.winograd_pays(edge, jnp.ones((3, 3, 64, 64)), *same)
  assert not layers.winograd_pays(edge, jnp.ones((3, 3, 64, 64)), (1, 1),   # 3362 tiles
                                  ((2, 2), (2, 2)), (1, 1))
  assert not layers.winograd_pays(x, jnp.ones((1, 1, 256, 512)), (1, 1),    # 1x1
                                  ((0, 0), (0, 0)), (1, 1))
  assert not layers.winograd_pays(x, jnp.ones((3, 3, 256, 256)), (2, 2),    # strided
                                  ((1, 1), (1, 1)), (1, 1))
  assert not layers.winograd_pays(x.astype(jnp.bfloat16),                  # not float32
                                  jnp.ones((3, 3, 256, 256), jnp.bfloat16), *same)
  assert not layers.winograd_pays(x, jnp.ones((3, 3, 256, 256)), (1, 1),    # ASPP d=24:
                                  ((24, 24), (24, 24)), (24, 24))           # tap matmuls


def test_tap_matmuls_pay_for_1x1_wide_and_mostly_padding_convs_only():
  pay = lambda x_shape, k, cin, cout, d: layers.tap_matmuls_pay(  # noqa: E731
      x_shape, (k, k, cin, cout), (1, 1), layers.torch_padding(k, d), (d, d))
  assert pay((2, 80, 80, 16), 1, 16, 16, 1)            # 1x1: one matmul
  assert pay((2, 40, 40, 256), 3, 256, 256, 2)         # Cin * Cout = 256 * 256
  assert pay((2, 40, 40, 2048), 3, 2048, 256, 12)      # ASPP
  assert pay((16, 3, 3, 32), 3, 32, 32, 1)             # 3x3 on 3x3: 0.4 padding
  assert not pay((2, 80, 80, 64), 3, 64, 64, 1)        # narrow 3x3: XLA's conv
  assert not pay((16, 48, 48, 3), 3, 3, 16, 1)


def test_narrow_3x3_convs_are_winograd_only_where_not_differentiated():
  """A 64->64 3x3 conv under 'tap_matmuls': Winograd's forward when evaluated (no XLA
  conv, the plain conv's output), XLA's conv and gradients under jax.grad."""
  x = jax.random.normal(jax.random.key(12), (2, 10, 10, 64))
  with layers.conv_weight_grad('tap_matmuls'):
    conv = layers.conv2d(64, 3, use_bias=False)
    params = conv.init(jax.random.key(13), x)
  apply = lambda p, x_: conv.apply(p, x_)  # noqa: E731
  plain = lambda p, x_: layers._conv_nhwc(  # noqa: E731
      x_, p['params']['kernel'], (1, 1), ((1, 1), (1, 1)), (1, 1))
  assert layers.winograd_pays(x, params['params']['kernel'], (1, 1), ((1, 1), (1, 1)), (1, 1))
  assert 'convolution' not in jax.jit(apply).lower(params, x).as_text()
  np.testing.assert_allclose(jax.jit(apply)(params, x), plain(params, x), rtol=1e-5,
                             atol=1e-5 * float(jnp.max(jnp.abs(plain(params, x)))))
  loss = lambda f: lambda p, x_: jnp.sum(f(p, x_) ** 2)  # noqa: E731
  grad = jax.jit(jax.grad(loss(apply), argnums=(0, 1)))
  hlo = grad.lower(params, x).as_text()
  assert hlo.count('convolution') == 3 and 'dot_general' not in hlo  # fwd, dx, dw: XLA's
  got = grad(params, x)
  want = jax.grad(loss(plain), argnums=(0, 1))(params, x)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * float(jnp.max(jnp.abs(b))))


def test_tap_matmuls_option_leaves_narrow_3x3_convs_to_xla():
  x = jnp.ones((1, 12, 12, 16))
  with layers.conv_weight_grad('tap_matmuls'):
    narrow = layers.conv2d(16, 3)
    wide = layers.conv2d(16, 1)
    prims = {name: _primitives(lambda x_, m=m: m.init_with_output(jax.random.key(0), x_)[0], x)
             for name, m in (('narrow', narrow), ('wide', wide))}
  assert 'custom_vjp_call' not in prims['narrow'] and 'conv_general_dilated' in prims['narrow']
  assert 'custom_vjp_call' in prims['wide'] and 'conv_general_dilated' not in prims['wide']


@pytest.mark.parametrize('impl', ['taps', 'taps_1x1', 'tap_matmuls', 'auto'])
def test_conv_weight_grad_option_keeps_params_outputs_and_gradients(impl):
  """A ConvBN stack under `conv_weight_grad(impl)`: same parameters, outputs and
  gradients (to float rounding) as the default XLA gradient."""

  class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
      x = layers.ConvBN(8, 3, strides=2)(x, train=True)
      x = layers.ConvBN(8, 1)(x, train=True)
      return layers.conv2d(3, 3, dilation=2, name='head')(x)

  x = jax.random.normal(jax.random.key(2), (2, 12, 12, 3))
  net = Net()
  variables = net.init(jax.random.key(0), x)

  def loss(params, x_):
    out, _ = net.apply({**variables, 'params': params}, x_, mutable=['batch_stats'])
    return jnp.sum(out ** 2)

  with layers.conv_weight_grad('xla'):
    want = jax.grad(loss, argnums=(0, 1))(variables['params'], x)
  with layers.conv_weight_grad(impl):
    assert jax.tree.structure(net.init(jax.random.key(0), x)) == jax.tree.structure(variables)
    got = jax.jit(jax.grad(loss, argnums=(0, 1)))(variables['params'], x)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4), got, want)


@pytest.mark.parametrize('channels,wide', [(8, False), (256, True)])
def test_tap_matmuls_nested_never_uses_xlas_filter_gradient(channels, wide):
  """'tap_matmuls_nested' (convs inside a conditional): wide convs as 'tap_matmuls',
  narrow ones as 'taps' (per-tap filter gradient) instead of XLA's conv and gradients;
  no row blocks. The values and gradients are the plain conv's."""
  x = jax.random.normal(jax.random.key(12), (2, 160, 160, channels)) if not wide else \
      jax.random.normal(jax.random.key(12), (2, 6, 6, channels))
  conv = layers.conv2d(channels, 3, weight_grad='xla')
  variables = conv.init(jax.random.key(13), x)
  loss = lambda c: lambda v: jnp.sum(c.apply(v, x) ** 2)  # noqa: E731
  want = jax.grad(loss(conv))(variables)
  nested = layers.conv2d(channels, 3, weight_grad='tap_matmuls_nested')
  grad = jax.jit(jax.grad(loss(nested)))
  got = grad(variables)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-3)
  hlo = grad.lower(variables).as_text()
  # narrow: XLA's forward only (x is a constant, so no input gradient; XLA's filter
  # gradient would be a second conv, and 'tap_matmuls' row-blocks 2x160x160 into 14);
  # wide: Winograd forward, matmul gradients, no conv at all.
  assert hlo.count('stablehlo.convolution') == (0 if wide else 1)
  with layers.conv_weight_grad('tap_matmuls'):
    assert layers.current_conv_weight_grad() == 'tap_matmuls'
  with layers.conv_weight_grad('xla'):
    assert layers.current_conv_weight_grad() == 'xla'


def test_auto_conv_weight_grad_is_tap_matmuls_on_cpu_and_xla_elsewhere(monkeypatch):
  assert jax.default_backend() == 'cpu'
  assert layers.resolve_conv_weight_grad('auto') == 'tap_matmuls'
  assert layers.resolve_conv_weight_grad('taps') == 'taps'
  # What conv2d builds outside any context: per-tap matmuls for every kernel size.
  assert layers.conv2d(4, 1).conv_general_dilated is layers.conv_general_dilated_tap_matmuls
  assert layers.conv2d(4, 3).conv_general_dilated is layers.conv_general_dilated_tap_matmuls
  with layers.conv_weight_grad('taps_1x1'):
    assert layers.conv2d(4, 1).conv_general_dilated is layers.conv_general_dilated_taps
    assert layers.conv2d(4, 3).conv_general_dilated is None
  monkeypatch.setattr(jax, 'default_backend', lambda: 'gpu')
  assert layers.resolve_conv_weight_grad('auto') == 'xla'
  assert layers.conv2d(4, 1).conv_general_dilated is None


def test_conv_weight_grad_rejects_unknown_impl():
  with pytest.raises(ValueError, match=r"conv_weight_grad='im2col'.*'taps'"):
    with layers.conv_weight_grad('im2col'):
      pass
  with pytest.raises(ValueError, match='weight_grad='):
    layers.conv2d(4, weight_grad='fast')


def test_computed_once_keeps_values_and_gradients_and_stops_xla_recomputing_a_chain():
  """x / (1 + 0 * isnan(x)) is x for every value (infinities and NaN included), its
  gradient is the identity, and XLA no longer recomputes a residual chain's outputs in
  each consumer (which kept every layer's matmul output alive): 1 against 6 x-sized
  buffers of temporaries here."""
  x = jnp.array([0.0, -0.0, 1.5, -2.25e-39, 3e38, jnp.inf, -jnp.inf, jnp.nan])
  got = jax.jit(layers.computed_once)(x)
  np.testing.assert_array_equal(got, x)
  assert np.array_equal(np.signbit(got), np.signbit(x))
  grad = jax.grad(lambda v: jnp.sum(layers.computed_once(v) * jnp.arange(3.0)))(jnp.ones(3))
  np.testing.assert_array_equal(grad, jnp.arange(3.0))
  x = jax.random.normal(jax.random.key(0), (3200, 256))
  ws = [jax.random.normal(jax.random.key(1 + i), (256, 256)) / 16 for i in range(6)]

  def chain(store):
    def run(x, ws):
      for w in ws:                                   # residual layers: relu(x W + x)
        x = nn.relu(jnp.dot(x, w) * 0.5 + 0.1 + x)
        x = layers.computed_once(x) if store else x
      return x
    return run

  assert _temp_bytes(chain(True), x, ws) <= 2 * x.nbytes
  assert _temp_bytes(chain(False), x, ws) >= 4 * x.nbytes


def test_recompute_in_backward_keeps_gradients_and_keeps_only_the_inputs():
  """Four blocks of three tanh layers: gradients equal to plain autodiff's (also of an
  output without a gradient, as BatchNorm's running averages are), and XLA's temporaries
  hold the blocks' inputs instead of every layer's output: 6 against 12 x-sized buffers.
  (`jax.checkpoint` on XLA CPU: 15.)"""
  x = jax.random.normal(jax.random.key(3), (2048, 128))
  ws = [[jax.random.normal(jax.random.key(10 * b + i), (128, 128)) / 12 for i in range(3)]
        for b in range(4)]

  def block(w, x):
    for wi in w:
      x = jnp.tanh(x @ wi)
    return x, jnp.mean(x, axis=0)                    # an output nothing differentiates

  def loss(block_fn):
    def run(ws, x):
      for w in ws:
        x, _ = block_fn(w, x)
      return jnp.sum(x ** 2)
    return jax.grad(run, argnums=(0, 1))

  plain = jax.jit(loss(block))(ws, x)
  recomputed = jax.jit(loss(layers.recompute_in_backward(block)))(ws, x)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
               recomputed, plain)
  kept = _temp_bytes(loss(layers.recompute_in_backward(block)), ws, x)
  assert kept <= 0.6 * _temp_bytes(loss(block), ws, x)
  stats_grad = jax.grad(lambda w: jnp.sum(layers.recompute_in_backward(block)(w, x)[1]))(
      ws[0])
  np.testing.assert_allclose(stats_grad, jax.grad(lambda w: jnp.sum(block(w, x)[1]))(ws[0]),
                             rtol=1e-5, atol=1e-6)


def test_after_ignores_a_non_finite_anchor():
  x = jax.random.normal(jax.random.key(2), (3, 4))
  for bad in (jnp.nan, jnp.inf, -jnp.inf):
    np.testing.assert_array_equal(layers.after(jnp.full((2,), bad), x)[0], x)


@pytest.mark.parametrize('flip_transpose', [False, True])
def test_conv3x3_winograd_in_output_channel_chunks_equals_one_chunk(flip_transpose,
                                                                   monkeypatch):
  """One input chunk, its transform shared, the products and output by output-channel
  chunks (the 2048-channel input gradient of FCN-ResNet50's head)."""
  x = jax.random.normal(jax.random.key(6), (2, 10, 10, 4))
  w = jax.random.normal(jax.random.key(7), (3, 3, 12, 4) if flip_transpose else (3, 3, 4, 12))
  padding = ((1, 1), (1, 1))
  conv = jax.jit(lambda x_, w_: layers.conv3x3_winograd(x_, w_, padding, (1, 1),
                                                        flip_transpose=flip_transpose))
  whole = conv(x, w)
  # 16 * 2 * 5 * 5 tiles * 4 bytes = 3200 bytes per channel: the 4 input channels are one
  # chunk, the 12 outputs three of 4.
  monkeypatch.setattr(layers, 'WINOGRAD_CHUNK_BYTES', 5 * 3200)
  assert layers._winograd_chunks(x, 2 * 5 * 5) == [(0, 4)]
  assert layers._winograd_channel_chunk(2 * 5 * 5, 12) == 4
  jax.clear_caches()
  chunked = conv(x, w)
  assert chunked.shape == whole.shape == (2, 10, 10, 12)
  np.testing.assert_allclose(chunked, whole, rtol=1e-5, atol=1e-5)
  plain_w = jnp.flip(w, (0, 1)).transpose(0, 1, 3, 2) if flip_transpose else w
  np.testing.assert_allclose(chunked, layers._conv_nhwc(x, plain_w, (1, 1), padding, (1, 1)),
                             rtol=1e-5, atol=1e-4)


def test_ordered_tap_matmuls_keep_values_and_copy_one_window_at_a_time():
  """`ordered`: each tap's window waits for the previous tap's sum, so XLA no longer
  copies every tap's window of x first (DeepLab's rate-12 ASPP conv on 2x20x20x512:
  1.9 against 4.5 MB of temporaries)."""
  x = jax.random.normal(jax.random.key(3), (2, 20, 20, 512))
  w = jax.random.normal(jax.random.key(4), (3, 3, 512, 64)) / 40.0
  args = ((1, 1), ((12, 12), (12, 12)), (12, 12))
  ordered = jax.jit(lambda x_, w_: layers.conv_as_tap_matmuls(x_, w_, *args, ordered=True))
  free = jax.jit(lambda x_, w_: layers.conv_as_tap_matmuls(x_, w_, *args))
  np.testing.assert_allclose(ordered(x, w), free(x, w), rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(ordered(x, w), layers._conv_nhwc(x, w, *args), rtol=1e-5,
                             atol=1e-4)
  assert (ordered.lower(x, w).compile().memory_analysis().temp_size_in_bytes
          <= 0.6 * free.lower(x, w).compile().memory_analysis().temp_size_in_bytes)


@pytest.mark.parametrize('size,kernel,dilation,cin', [(20, 3, 12, 64), (9, 5, 3, 6), (11, 3, 2, 7)])
def test_tap_matmul_grads_equal_autodiff_and_keep_fewer_windows(size, kernel, dilation, cin):
  """The stride-1 tap-matmul conv's gradients tap after tap (dx accumulated in place)
  equal autodiff's of `conv_as_tap_matmuls`, with lower temporaries (autodiff keeps
  every tap's window of x): uneven padding, dilated taps partly in the padding."""
  x = jax.random.normal(jax.random.key(0), (2, size, size + 1, cin))
  w = jax.random.normal(jax.random.key(1), (kernel, kernel, cin, 5)) / 10
  reach = dilation * (kernel // 2)
  padding = ((reach, reach), (reach - 1, reach + 1))
  args = ((1, 1), padding, (dilation, dilation))
  assert layers.tap_count(x.shape, w.shape, padding, (dilation, dilation)) > 1
  y = layers.conv_as_tap_matmuls(x, w, *args)
  dy = jax.random.normal(jax.random.key(2), y.shape)
  ours = jax.jit(lambda x_, w_, dy_: layers.tap_matmul_grads(x_, w_, dy_, padding,
                                                             (dilation, dilation)))
  autodiff = jax.jit(lambda x_, w_, dy_: jax.vjp(
      lambda a, b: layers.conv_as_tap_matmuls(a, b, *args), x_, w_)[1](dy_))
  for got, want in zip(ours(x, w, dy), autodiff(x, w, dy)):
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6 * float(jnp.max(jnp.abs(want))))
  temp = lambda f: f.lower(x, w, dy).compile().memory_analysis().temp_size_in_bytes  # noqa: E731
  assert temp(ours) <= 0.8 * temp(autodiff), (temp(ours), temp(autodiff))
