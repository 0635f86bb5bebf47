"""Tests for segjax.models.vgg."""

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from segjax.models import vgg

from model_test_utils import TINY, abstract_init, conv_dilations, count


@pytest.mark.parametrize('ctor,features_params,bn_channels,torchvision_total', [
    (vgg.VGG16, 14_714_688, 0, 138_357_544),
    (vgg.VGG16BN, 14_714_688, 4224, 138_365_992),
    (vgg.VGG19, 20_024_384, 0, 143_667_240),
    (vgg.VGG19BN, 20_024_384, 5504, 143_678_248),
])
def test_param_counts_match_torchvision(ctor, features_params, bn_channels,
                                        torchvision_total):
  variables = abstract_init(ctor())
  params = variables['params']
  convs = {k: v['conv'] for k, v in params.items() if k.startswith('conv')}
  assert count(convs) == features_params
  # fc6 / fc7 as convs hold exactly torchvision's classifier.0 / .3 weights;
  # only fc8 (4096 * 1000 + 1000) is missing.
  assert count(params) == torchvision_total - 4_097_000
  assert count(variables.get('batch_stats', {})) == 2 * bn_channels
  assert params['fc6']['kernel'].shape == (7, 7, 512, 4096)
  assert params['fc7']['kernel'].shape == (1, 1, 4096, 4096)


def test_torchvision_names_cover_every_module():
  names16 = vgg.torchvision_names(16, batch_norm=False)
  assert names16['conv1_1/conv'] == 'features.0'
  assert names16['conv3_1/conv'] == 'features.10'
  assert names16['conv5_3/conv'] == 'features.28'  # last conv of torchvision vgg16
  assert names16['fc6'] == 'classifier.0' and names16['fc7'] == 'classifier.3'
  names16bn = vgg.torchvision_names(16, batch_norm=True)
  assert names16bn['conv5_3/conv'] == 'features.40'
  assert names16bn['conv5_3/bn'] == 'features.41'
  assert vgg.torchvision_names(19, batch_norm=False)['conv5_4/conv'] == 'features.34'
  for depth, ctor in ((16, vgg.VGG16BN), (19, vgg.VGG19BN)):
    flat = flax.traverse_util.flatten_dict(abstract_init(ctor())['params'], sep='/')
    modules = {k.rsplit('/', 1)[0] for k in flat}
    assert modules == set(vgg.torchvision_names(depth, batch_norm=True))


@pytest.mark.parametrize('ctor', [vgg.VGG16, vgg.VGG16BN])
@pytest.mark.parametrize('output_stride', [8, 16, 32])
@pytest.mark.parametrize('hw', [(64, 64), (50, 38)])
def test_feature_shapes_match_strides(ctor, output_stride, hw):
  model = ctor(width_multiplier=TINY, output_stride=output_stride, fc_kernel_size=3)
  x = jax.ShapeDtypeStruct((2,) + hw + (3,), jnp.float32)
  out = jax.eval_shape(
      lambda x: model.init_with_output(jax.random.key(0), x, train=False)[0], x)
  strides = model.feature_strides()
  channels = model.feature_channels()
  assert set(out) == {'pool1', 'pool2', 'pool3', 'pool4', 'pool5', 'fc7'}
  for name, feat in out.items():
    s = strides[name]
    assert feat.shape == (2, -(-hw[0] // s), -(-hw[1] // s), channels[name]), name
  assert strides['fc7'] == output_stride
  assert channels == {'pool1': 8, 'pool2': 8, 'pool3': 16, 'pool4': 32, 'pool5': 32,
                      'fc7': 256}


def test_output_stride_dilates_following_convs():
  def kernel_dilations(output_stride):
    model = vgg.VGG16(width_multiplier=TINY, output_stride=output_stride)
    return conv_dilations(model, jnp.zeros((1, 32, 32, 3)))

  # 13 convs + fc6 + fc7; DeepLab v1: OS16 dilates fc6 by 2; OS8 conv5_x by 2, fc6 by 4.
  assert kernel_dilations(32) == [(1, 1)] * 15
  assert kernel_dilations(16) == [(1, 1)] * 13 + [(2, 2), (1, 1)]
  assert kernel_dilations(8) == [(1, 1)] * 10 + [(2, 2)] * 3 + [(4, 4), (1, 1)]


def test_ceil_mode_pooling_and_dropout():
  model = vgg.VGG16(width_multiplier=TINY, fc_kernel_size=1)
  x = jax.random.normal(jax.random.key(0), (2, 33, 31, 3))
  variables = model.init(jax.random.key(0), x, train=False)
  assert 'batch_stats' not in variables
  eval_out = model.apply(variables, x, train=False)
  assert eval_out['pool1'].shape == (2, 17, 16, 8)
  # pool1 equals the max over each 2x2 window, the ragged last row/col included.
  _, state = model.apply(variables, x, train=False, mutable=['intermediates'],
                         capture_intermediates=lambda mdl, _: mdl.name == 'conv1_2')
  conv = state['intermediates']['conv1_2']['__call__'][0]
  np.testing.assert_array_equal(eval_out['pool1'][:, -1, -1], conv[:, 32, 30])
  np.testing.assert_array_equal(eval_out['pool1'][:, 0, 0],
                                conv[:, :2, :2].max(axis=(1, 2)))
  # Dropout is active only in training, and keyed by the 'dropout' rng.
  a = model.apply(variables, x, train=True, rngs={'dropout': jax.random.key(1)})['fc7']
  b = model.apply(variables, x, train=True, rngs={'dropout': jax.random.key(2)})['fc7']
  assert not np.allclose(a, b)
  assert float((a == 0).mean()) > float((eval_out['fc7'] == 0).mean())
