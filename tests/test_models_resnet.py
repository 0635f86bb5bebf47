"""Tests for segjax.models.resnet."""

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from segjax.models import layers, resnet

from model_test_utils import TINY, abstract_init, count


# torchvision resnetN(): total params minus the fc layer (512*e*1000 + 1000).
@pytest.mark.parametrize('ctor,torchvision_total,fc', [
    (resnet.ResNet18, 11_689_512, 513_000),
    (resnet.ResNet34, 21_797_672, 513_000),
    (resnet.ResNet50, 25_557_032, 2_049_000),
    (resnet.ResNet101, 44_549_160, 2_049_000),
    (resnet.ResNet152, 60_192_808, 2_049_000),
])
def test_param_counts_match_torchvision(ctor, torchvision_total, fc):
  variables = abstract_init(ctor())
  assert count(variables['params']) == torchvision_total - fc
  # running mean + var: one pair per BN channel, i.e. as many as BN (scale, bias).
  bn_params = count({k: v for k, v in flax.traverse_util.flatten_dict(
      variables['params'], sep='/').items() if k.endswith(('scale', 'bias'))})
  assert count(variables['batch_stats']) == bn_params


def test_resnet50_param_names_mirror_torchvision():
  flat = flax.traverse_util.flatten_dict(abstract_init(resnet.ResNet50())['params'], sep='/')
  names = {resnet.torchvision_name(k): v.shape for k, v in flat.items()}
  assert names['conv1.weight'] == (7, 7, 3, 64)
  assert names['layer1.0.downsample.0.weight'] == (1, 1, 64, 256)
  assert names['layer1.0.downsample.1.bias'] == (256,)
  # v1.5: the stride-2 block of layer2 has the 3x3 conv2, whose kernel is 3x3.
  assert names['layer2.0.conv2.weight'] == (3, 3, 128, 128)
  assert names['layer4.2.bn3.weight'] == (2048,)
  assert 'layer3.5.conv3.weight' in names and 'layer3.6.conv3.weight' not in names
  assert resnet.torchvision_name('layer4_2/bn3/var') == 'layer4.2.bn3.running_var'


@pytest.mark.parametrize('ctor', [resnet.ResNet18, resnet.ResNet50])
@pytest.mark.parametrize('output_stride', [8, 16, 32])
@pytest.mark.parametrize('hw', [(64, 64), (50, 38)])
def test_feature_shapes_match_strides(ctor, output_stride, hw):
  model = ctor(width_multiplier=TINY, output_stride=output_stride)
  x = jax.ShapeDtypeStruct((2,) + hw + (3,), jnp.float32)
  out = jax.eval_shape(
      lambda x: model.init_with_output(jax.random.key(0), x, train=False)[0], x)
  strides = model.feature_strides()
  channels = model.feature_channels()
  assert set(out) == {'stem', 'res2', 'res3', 'res4', 'res5'}
  for name, feat in out.items():
    s = strides[name]
    assert feat.shape == (2, -(-hw[0] // s), -(-hw[1] // s), channels[name]), name
  assert strides['res5'] == output_stride


@pytest.mark.parametrize('stem_stride', [1, 2, 4])
@pytest.mark.parametrize('hw', [(64, 64), (50, 38)])
def test_stem_stride_divides_every_stride_and_keeps_the_weights(stem_stride, hw):
  model = resnet.ResNet18(width_multiplier=TINY, stem_stride=stem_stride)
  x = jax.ShapeDtypeStruct((2,) + hw + (3,), jnp.float32)
  out = jax.eval_shape(
      lambda x: model.init_with_output(jax.random.key(0), x, train=False)[0], x)
  strides = model.feature_strides()
  assert strides == {'stem': min(2, stem_stride), 'res2': stem_stride, 'res3': 2 * stem_stride,
                     'res4': 4 * stem_stride, 'res5': 8 * stem_stride}
  for name, feat in out.items():
    s = strides[name]
    assert feat.shape[1:3] == (-(-hw[0] // s), -(-hw[1] // s)), name
  # Same parameter tree as torchvision's stem, so converted weights load unchanged.
  shapes = jax.tree_util.tree_map(lambda a: a.shape, abstract_init(model, (1, 64, 64, 3)))
  standard = resnet.ResNet18(width_multiplier=TINY)
  assert shapes == jax.tree_util.tree_map(lambda a: a.shape,
                                          abstract_init(standard, (1, 64, 64, 3)))


def test_stem_stride_2_is_the_standard_net_without_its_max_pool():
  """Same weights: the stems agree, res2 is twice the size, and max-pooling the
  stem_stride-2 stem by hand then running layer1 gives the standard res2."""
  x = jnp.asarray(np.random.default_rng(0).normal(size=(1, 32, 32, 3)), jnp.float32)
  standard = resnet.ResNet18(width_multiplier=TINY)
  no_pool = resnet.ResNet18(width_multiplier=TINY, stem_stride=2)
  variables = standard.init(jax.random.key(0), x, train=False)
  a = standard.apply(variables, x, train=False)
  b = no_pool.apply(variables, x, train=False)
  np.testing.assert_array_equal(a['stem'], b['stem'])
  assert a['res2'].shape[1] * 2 == b['res2'].shape[1]
  pooled = flax.linen.max_pool(b['stem'], (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
  layer1 = [resnet.BasicBlock(planes=resnet.scale_width(64, TINY), strides=1, dilation=1,
                              first_dilation=1, downsample=False, name=f'layer1_{j}')
            for j in range(2)]
  y = pooled
  for j, block in enumerate(layer1):
    y = block.apply({'params': variables['params'][f'layer1_{j}'],
                     'batch_stats': variables['batch_stats'][f'layer1_{j}']}, y, train=False)
  np.testing.assert_allclose(y, a['res2'], rtol=1e-6, atol=1e-6)


def test_stem_stride_rejects_bad_values():
  x = jnp.zeros((1, 32, 32, 3))
  with pytest.raises(ValueError, match=r'stem_stride must be one of \(1, 2, 4\), got 3'):
    resnet.ResNet18(width_multiplier=TINY, stem_stride=3).init(jax.random.key(0), x, train=False)


@pytest.mark.parametrize('stem_stride', [1, 2])
@pytest.mark.parametrize('output_stride', [8, 16])
def test_small_stem_with_dilation_is_the_dilated_net_at_a_finer_grid(stem_stride, output_stride):
  """output_stride keeps its dilation pattern under a small stem: every stride divides
  by 4 / stem_stride, and with the same weights res5 subsampled at the dilated stages'
  stride equals the undilated small-stem net's res5 (the stride-vs-dilation identity)."""
  x = jnp.asarray(np.random.default_rng(1).normal(size=(1, 32, 32, 3)), jnp.float32)
  plain = resnet.ResNet18(width_multiplier=TINY, stem_stride=stem_stride)
  dilated = resnet.ResNet18(width_multiplier=TINY, stem_stride=stem_stride,
                            output_stride=output_stride)
  variables = plain.init(jax.random.key(0), x, train=False)
  a = plain.apply(variables, x, train=False)
  b = dilated.apply(variables, x, train=False)
  s = stem_stride
  top = output_stride * s // 4
  assert dilated.feature_strides() == {'stem': min(2, s), 'res2': s, 'res3': 2 * s,
                                       'res4': min(4 * s, top), 'res5': top}
  for name, stride in dilated.feature_strides().items():
    assert b[name].shape[1] == -(-32 // stride), name
  step = 8 * s // top
  np.testing.assert_allclose(b['res5'][:, ::step, ::step], a['res5'], rtol=1e-5, atol=1e-5)


def test_width_multiplier_and_minimum_width():
  m = resnet.ResNet50(width_multiplier=TINY)
  assert m.feature_channels() == {'stem': 8, 'res2': 32, 'res3': 32, 'res4': 64,
                                  'res5': 128}
  assert resnet.ResNet18(width_multiplier=0.5).feature_channels()['res5'] == 256


def _random_eval_variables(model, x):
  """Init, then give BN non-trivial running stats so eval mode is a real test."""
  variables = model.init(jax.random.key(0), x, train=False)
  keys = iter(jax.random.split(jax.random.key(1), 4 * len(jax.tree_util.tree_leaves(variables))))

  def perturb(path, leaf):
    name = path[-1].key
    if name == 'var':
      return jax.random.uniform(next(keys), leaf.shape, minval=0.5, maxval=1.5)
    if name in ('mean', 'bias'):
      return 0.1 * jax.random.normal(next(keys), leaf.shape)
    if name == 'scale':
      return jax.random.uniform(next(keys), leaf.shape, minval=0.5, maxval=1.5)
    return leaf

  return jax.tree_util.tree_map_with_path(perturb, variables)


@pytest.mark.parametrize('ctor', [resnet.ResNet18, resnet.ResNet50])
def test_dilated_network_subsampled_equals_strided_network(ctor):
  # Exact identity (eval mode, same weights): a stride-2 conv is the stride-1 conv
  # subsampled at 2, and a rate-r conv on a map, subsampled at r, is the rate-1
  # conv on the subsampled map (zero padding included). Pointwise ops (BN in eval,
  # ReLU, residual add) commute with subsampling. So with torchvision's
  # replace_stride_with_dilation: res5[OS8][::4, ::4] == res5[OS32] and
  # res5[OS16][::2, ::2] == res5[OS32], for any input size.
  x = jax.random.normal(jax.random.key(2), (1, 50, 38, 3))
  nets = {os: ctor(width_multiplier=TINY, output_stride=os) for os in (8, 16, 32)}
  variables = _random_eval_variables(nets[32], x)
  out = {os: m.apply(variables, x, train=False) for os, m in nets.items()}
  ref = out[32]['res5']
  assert out[8]['res5'].shape[1:3] == (4 * ref.shape[1] - 1, 4 * ref.shape[2] - 3)
  scale = float(jnp.abs(ref).max())
  assert scale > 0.1
  # The random BN scales grow ResNet-50's res5 to ~2e3, where float32 rounding of the
  # different summation orders reaches ~4e-4 (1.6e-7 of the scale): near-zero elements
  # get an absolute tolerance relative to the map's scale. A wrong alignment is O(scale).
  atol = 1e-4 + 1e-6 * scale
  np.testing.assert_allclose(out[8]['res5'][:, ::4, ::4], ref, rtol=1e-4, atol=atol)
  np.testing.assert_allclose(out[16]['res5'][:, ::2, ::2], ref, rtol=1e-4, atol=atol)
  np.testing.assert_allclose(out[8]['res4'][:, ::2, ::2], out[32]['res4'],
                             rtol=1e-4, atol=atol)


def test_single_atrous_conv_identity():
  # subsample_r(conv_rate_r(u)) == conv_rate_1(subsample_r(u)), with PyTorch padding.
  u = jax.random.normal(jax.random.key(0), (1, 23, 17, 3))
  kernel = jax.random.normal(jax.random.key(1), (3, 3, 3, 4))
  for r in (2, 4):
    dilated = layers.conv2d(4, 3, dilation=r, use_bias=False)
    plain = layers.conv2d(4, 3, use_bias=False)
    p = {'params': {'kernel': kernel}}
    np.testing.assert_allclose(dilated.apply(p, u)[:, ::r, ::r],
                               plain.apply(p, u[:, ::r, ::r]), rtol=1e-5, atol=1e-5)


def test_receptive_field_is_kept_by_dilation():
  # The gradient of one res5 pixel w.r.t. the input has the same support (and,
  # by the identity above, the same values) in the strided and dilated nets.
  # ResNet-18's res5 sees ~435 px, so use a tall strip and the top pixel row.
  x = jax.random.normal(jax.random.key(3), (1, 320, 40, 3))
  os32 = resnet.ResNet18(width_multiplier=TINY, output_stride=32)
  os8 = resnet.ResNet18(width_multiplier=TINY, output_stride=8)
  variables = _random_eval_variables(os32, x)

  def pixel(model, i, j):
    return lambda x: model.apply(variables, x, train=False)['res5'][0, i, j].sum()

  g32 = jax.grad(pixel(os32, 0, 1))(x)
  g8 = jax.grad(pixel(os8, 0, 4))(x)
  support32 = np.abs(np.asarray(g32)).sum(-1)[0] > 0
  support8 = np.abs(np.asarray(g8)).sum(-1)[0] > 0
  rows = np.flatnonzero(support32.any(axis=1))
  assert rows[0] == 0 and 150 < rows[-1] < 300, rows[-1]
  np.testing.assert_array_equal(support8, support32)
  np.testing.assert_allclose(g8, g32, rtol=1e-3, atol=1e-5)


def test_zero_init_residual_and_train_mode_updates_batch_stats():
  x = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))
  model = resnet.ResNet18(width_multiplier=TINY, zero_init_residual=True)
  variables = model.init(jax.random.key(0), x, train=False)
  assert float(jnp.abs(variables['params']['layer1_0']['bn2']['scale']).max()) == 0.0
  assert float(variables['params']['bn1']['scale'].min()) == 1.0
  _, updates = model.apply(variables, x, train=True, mutable=['batch_stats'])
  before = variables['batch_stats']['bn1']['mean']
  after = updates['batch_stats']['bn1']['mean']
  assert float(jnp.abs(after - before).max()) > 0


def test_bfloat16_compute_dtype_keeps_float32_params():
  x = jnp.ones((1, 32, 32, 3))
  model = resnet.ResNet18(width_multiplier=TINY, dtype=jnp.bfloat16)
  variables = model.init(jax.random.key(0), x, train=False)
  assert all(p.dtype == jnp.float32 for p in jax.tree_util.tree_leaves(variables))
  assert model.apply(variables, x, train=False)['res5'].dtype == jnp.bfloat16
