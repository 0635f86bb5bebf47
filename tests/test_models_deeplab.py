"""Tests for segjax.models.deeplab (built through the registry, as the trainer does)."""

import math

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from segjax import models
from segjax.models import deeplab, layers

from model_test_utils import TINY, abstract_init, conv_dilations as conv_dilation_pairs, count

NUM_CLASSES = 5
V1 = ('deeplab_v1', 'deeplab_v1_largefov', 'deeplab_v1_msc', 'deeplab_v1_msc_largefov')


def tiny_config(name, **overrides):
  config = models.default_model_config(name)
  config.width_multiplier = TINY
  if name not in V1:
    config.backbone = 'resnet18'
  config.update(overrides)
  return config


def random_variables(variables, scale=0.1, seed=7):
  """Every parameter replaced by noise (so no layer is an identity or zero)."""
  leaves, treedef = jax.tree_util.tree_flatten(variables['params'])
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  leaves = [scale * jax.random.normal(k, l.shape) for k, l in zip(keys, leaves)]
  return {**variables, 'params': jax.tree_util.tree_unflatten(treedef, leaves)}


def conv_dilations(model, x):
  """The (equal) row and column dilation of every convolution the model runs, in order."""
  return [d[0] for d in conv_dilation_pairs(model, x)]


# ---------------------------------------------------------------------------
# The hole algorithm.


@pytest.mark.parametrize('rate', [2, 3, 4])
def test_atrous_conv_is_the_conv_of_the_subsampled_signal_interleaved(rate):
  # Chen et al. 2015 §3.1 ("hole algorithm"): a rate-r 3x3 conv equals, for each of the
  # r x r phases (a, b), the plain 3x3 conv of x[a::r, b::r] written back at [a::r, b::r].
  h, w = 6 * rate, 5 * rate
  x = jax.random.normal(jax.random.key(0), (2, h, w, 3))
  atrous = layers.conv2d(4, 3, dilation=rate)
  plain = layers.conv2d(4, 3)
  params = atrous.init(jax.random.key(1), x)
  y = atrous.apply(params, x)
  interleaved = jnp.zeros_like(y)
  for a in range(rate):
    for b in range(rate):
      sub = plain.apply(params, x[:, a::rate, b::rate])
      interleaved = interleaved.at[:, a::rate, b::rate].set(sub)
  np.testing.assert_allclose(y, interleaved, rtol=1e-5, atol=1e-5)
  assert float(jnp.abs(y).max()) > 0.1


# ---------------------------------------------------------------------------
# Structure: the papers' and torchvision's numbers.


def test_v1_parameter_counts_match_the_paper():
  # Chen et al. 2015 Table 2: DeepLab-CRF-7x7 134.3M, DeepLab-CRF-LargeFOV 20.5M (VOC, 21
  # classes). By hand: VGG-16 convs 14,714,688; 7x7: fc6 7*7*512*4096 + 4096, fc7
  # 4096*4096 + 4096, fc8 4096*21 + 21; LargeFOV: fc6 3*3*512*1024 + 1024, fc7
  # 1024*1024 + 1024, fc8 1024*21 + 21.
  convs = 14_714_688
  expected = {
      'deeplab_v1': convs + 102_764_544 + 16_781_312 + 86_037,
      'deeplab_v1_largefov': convs + 4_719_616 + 1_049_600 + 21_525,
  }
  for name, want in expected.items():
    model = models.build_model(models.default_model_config(name), num_classes=21)
    assert count(abstract_init(model, (1, 64, 64, 3))['params']) == want
  assert round(expected['deeplab_v1'] / 1e6, 1) == 134.3
  assert round(expected['deeplab_v1_largefov'] / 1e6, 1) == 20.5
  # MSc adds 5 branches: (3*3*C_in*128 + 128) + (128*128 + 128), C_in = 3, 64, 128, 256,
  # 512, and fc8 reads 1024 + 640 channels.
  msc = sum(9 * c * 128 + 128 + 128 * 128 + 128 for c in (3, 64, 128, 256, 512)) + 640 * 21
  model = models.build_model(models.default_model_config('deeplab_v1_msc_largefov'),
                             num_classes=21)
  assert count(abstract_init(model, (1, 64, 64, 3))['params']) == \
      expected['deeplab_v1_largefov'] + msc


def test_v2_vgg_aspp_parameter_count():
  # Four fc6 (3x3, 1024) -> fc7 (1024) -> fc8 (21) branches on VGG-16's pool5 (no VGG fc6/fc7).
  branch = (9 * 512 * 1024 + 1024) + (1024 * 1024 + 1024) + (1024 * 21 + 21)
  model = models.build_model(tiny_config('deeplab_v2_aspp_l', backbone='vgg16',
                                         width_multiplier=1.0), num_classes=21)
  params = abstract_init(model, (1, 64, 64, 3))['params']
  assert count(params) == 14_714_688 + 4 * branch
  assert set(params) == {'backbone', 'aspp_0', 'aspp_1', 'aspp_2', 'aspp_3'}
  assert 'fc6' not in params['backbone']


def test_v2_7x7_on_vgg_is_deeplab_v1_7x7():
  # deeplab_v2_7x7 on VGG-16 is DeepLab-CRF-7x7: the same 134.3M parameters (counted by
  # hand in test_v1_parameter_counts_match_the_paper), fc6 7x7 x 4096 at rate 4.
  model = models.build_model(tiny_config('deeplab_v2_7x7', backbone='vgg16',
                                         width_multiplier=1.0), num_classes=21)
  params = abstract_init(model, (1, 64, 64, 3))['params']
  assert count(params) == 14_714_688 + 102_764_544 + 16_781_312 + 86_037
  assert params['aspp_0']['fc6']['kernel'].shape == (7, 7, 512, 4096)
  assert params['aspp_0']['fc7']['kernel'].shape == (1, 1, 4096, 4096)
  assert model.atrous_rates == (4,)


@pytest.mark.parametrize('backbone,torchvision_total', [
    ('resnet50', 42_004_074),    # torchvision deeplabv3_resnet50 (aux_loss=True), 21 classes
    ('resnet101', 60_996_202),   # torchvision deeplabv3_resnet101
])
def test_v3_parameter_count_matches_torchvision(backbone, torchvision_total):
  config = models.default_model_config('deeplab_v3')
  config.backbone, config.aux_loss = backbone, True
  model = models.build_model(config, num_classes=21)
  assert count(abstract_init(model, (1, 64, 64, 3))['params']) == torchvision_total


def test_v3_names_mirror_torchvision():
  config = models.default_model_config('deeplab_v3')
  config.backbone, config.aux_loss, config.width_multiplier = 'resnet50', True, TINY
  variables = abstract_init(models.build_model(config, num_classes=21), (1, 64, 64, 3))
  flat = {}
  for collection in ('params', 'batch_stats'):
    flat.update(flax.traverse_util.flatten_dict(variables[collection], sep='/'))
  names = {deeplab.torchvision_name(path) for path in flat}
  bn = ('weight', 'bias', 'running_mean', 'running_var')
  expected_head = {
      *(f'classifier.0.convs.{i}.0.weight' for i in range(4)),
      *(f'classifier.0.convs.{i}.1.{leaf}' for i in range(4) for leaf in bn),
      'classifier.0.convs.4.1.weight', *(f'classifier.0.convs.4.2.{leaf}' for leaf in bn),
      'classifier.0.project.0.weight', *(f'classifier.0.project.1.{leaf}' for leaf in bn),
      'classifier.1.weight', *(f'classifier.2.{leaf}' for leaf in bn),
      'classifier.4.weight', 'classifier.4.bias',
      'aux_classifier.0.weight', *(f'aux_classifier.1.{leaf}' for leaf in bn),
      'aux_classifier.4.weight', 'aux_classifier.4.bias',
  }
  assert {n for n in names if not n.startswith('backbone.')} == expected_head
  assert 'backbone.layer4.2.conv3.weight' in names
  assert 'backbone.layer1.0.downsample.1.running_var' in names
  assert deeplab.torchvision_name('classifier_0/convs_4/conv/kernel') == \
      'classifier.0.convs.4.1.weight'


# ---------------------------------------------------------------------------
# Output stride, feature shapes and dilation.

_ALL = sorted(models.DEEPLAB_MODELS)


@pytest.mark.parametrize('name', _ALL)
@pytest.mark.parametrize('hw', [(64, 64), (50, 38)])
def test_output_stride_and_shapes(name, hw):
  output_stride = 16 if name in ('deeplab_v3', 'deeplab_v3plus') else 8
  config = tiny_config(name, output_stride=output_stride, aux_loss=True, dtype='bfloat16')
  model = models.build_model(config, num_classes=NUM_CLASSES)
  x = jax.ShapeDtypeStruct((2,) + hw + (3,), jnp.float32)
  out = jax.eval_shape(
      lambda x: model.init_with_output(jax.random.key(0), x, train=False)[0], x)
  stride = 4 if name == 'deeplab_v3plus' else output_stride
  assert models.coarse_logits_stride(config) == stride == model.logits_stride()
  coarse = (2, math.ceil(hw[0] / stride), math.ceil(hw[1] / stride), NUM_CLASSES)
  assert out['coarse_logits'].shape == coarse
  assert out['logits'].shape == out['aux_logits'].shape == (2,) + hw + (NUM_CLASSES,)
  assert all(v.dtype == jnp.float32 for v in out.values())
  # The backbone maps the head reads, at their strides.
  feats = jax.eval_shape(lambda x: model.init_with_output(
      jax.random.key(0), x, train=False,
      method=lambda m, x, train: m.backbone(x, train=train))[0], x)
  strides = model.backbone.feature_strides()
  top = 'fc7' if name in V1 else model.feature_names.top
  assert strides[top] == output_stride
  for key, f in feats.items():
    assert f.shape[1:3] == (math.ceil(hw[0] / strides[key]), math.ceil(hw[1] / strides[key]))
  assert ('fc7' in feats) == (name in V1)


@pytest.mark.parametrize('name,expected_fc6_rate', [('deeplab_v1', 4),
                                                     ('deeplab_v1_largefov', 12)])
def test_v1_dilations(name, expected_fc6_rate):
  # 13 VGG convs: conv5_x at rate 2 (pool4 at stride 1), fc6 at the variant's rate, fc7, fc8.
  model = models.build_model(tiny_config(name), num_classes=NUM_CLASSES)
  assert conv_dilations(model, jnp.zeros((1, 32, 32, 3))) == \
      [1] * 10 + [2] * 3 + [expected_fc6_rate, 1, 1]


@pytest.mark.parametrize('name,output_stride,rates', [
    ('deeplab_v2_aspp_s', 8, (2, 4, 8, 12)),
    ('deeplab_v2_aspp_l', 8, (6, 12, 18, 24)),
    ('deeplab_v2_largefov', 8, (12,)),
    ('deeplab_v2_7x7', 8, (4,)),
    ('deeplab_v3', 16, (6, 12, 18)),
    ('deeplab_v3', 8, (12, 24, 36)),
])
def test_head_rates(name, output_stride, rates):
  config = tiny_config(name, backbone='vgg16', output_stride=output_stride)
  model = models.build_model(config, num_classes=NUM_CLASSES)
  assert model.atrous_rates == rates
  dilations = conv_dilations(model, jnp.zeros((1, 32, 32, 3)))
  head = dilations[13:]  # after the 13 VGG convs
  if name.startswith('deeplab_v2'):
    assert head == [d for r in rates for d in (r, 1, 1)]  # fc6, fc7, fc8 per branch
  else:
    assert head == [1, *rates, 1, 1, 1, 1]  # convs_0..4, project, classifier_1, _4


def test_v3plus_decoder_layers():
  model = models.build_model(tiny_config('deeplab_v3plus', width_multiplier=1.0,
                                         backbone='resnet50', output_stride=16),
                             num_classes=NUM_CLASSES)
  params = abstract_init(model, (1, 64, 64, 3))['params']
  assert set(params) == {'backbone', 'classifier_0', 'low_level_project', 'decoder_0',
                         'decoder_1', 'decoder_classifier'}
  # [v3+] §4.1: 48-channel reduction of res2 (256 channels); 3x3 convs on 256 + 48.
  assert params['low_level_project']['conv']['kernel'].shape == (1, 1, 256, 48)
  assert params['decoder_0']['conv']['kernel'].shape == (3, 3, 304, 256)
  assert params['decoder_1']['conv']['kernel'].shape == (3, 3, 256, 256)
  assert params['decoder_classifier']['kernel'].shape == (1, 1, 256, NUM_CLASSES)


# ---------------------------------------------------------------------------
# Numbers: upsampling, multi-scale fusion, frozen BatchNorm.


def test_logits_are_coarse_logits_upsampled_and_cropped():
  x = jax.random.normal(jax.random.key(0), (1, 50, 38, 3))
  model = models.build_model(tiny_config('deeplab_v2_aspp_s'), num_classes=NUM_CLASSES)
  variables = random_variables(model.init(jax.random.key(0), x, train=False))
  out = model.apply(variables, x, train=False)
  coarse = out['coarse_logits']                         # ceil(50/8) x ceil(38/8) = 7 x 5
  assert coarse.shape[1:3] == (7, 5)
  want = layers.bilinear_resize(coarse, (56, 40), align_corners=False)[:, :50, :38]
  np.testing.assert_allclose(out['logits'], want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize('name', ['deeplab_v2_aspp_l', 'deeplab_v3plus', 'deeplab_v1_msc'])
def test_multi_scale_inputs_are_max_fused(name):
  # [v2] §4.1 MSC: run the same network on the input at scales 1 and 0.5, bring the
  # scale-0.5 coarse logits to the scale-1 grid, take the per-position max.
  x = jax.random.normal(jax.random.key(0), (2, 48, 40, 3))
  single = models.build_model(tiny_config(name), num_classes=NUM_CLASSES)
  multi = models.build_model(tiny_config(name, input_scales=(1.0, 0.5)),
                             num_classes=NUM_CLASSES)
  variables = random_variables(single.init(jax.random.key(0), x, train=False))
  out = multi.apply(variables, x, train=False)  # same parameters: the weights are shared
  full = single.apply(variables, x, train=False)['coarse_logits']
  half_input = layers.bilinear_resize(x, (24, 20), align_corners=False)
  half = single.apply(variables, half_input, train=False)['coarse_logits']
  half = layers.bilinear_resize(half, full.shape[1:3], align_corners=False)
  np.testing.assert_allclose(out['scale_coarse_logits'][0], full, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(out['scale_coarse_logits'][1], half, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(out['coarse_logits'], jnp.maximum(full, half), rtol=1e-5,
                             atol=1e-5)
  assert 0.05 < float(jnp.mean(full > half)) < 0.95  # both scales win somewhere
  stride = single.logits_stride()
  up = layers.bilinear_resize(jnp.maximum(full, half), (full.shape[1] * stride,
                                                        full.shape[2] * stride),
                              align_corners=False)[:, :48, :40]
  np.testing.assert_allclose(out['logits'], up, rtol=1e-5, atol=1e-5)


def test_freeze_bn_uses_and_keeps_running_statistics():
  x = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))
  config = tiny_config('deeplab_v3', dropout_rate=0.0, aux_loss=True)
  frozen = models.build_model(tiny_config('deeplab_v3', dropout_rate=0.0, aux_loss=True,
                                          freeze_bn=True), num_classes=NUM_CLASSES)
  trained = models.build_model(config, num_classes=NUM_CLASSES)
  variables = random_variables(trained.init(jax.random.key(0), x, train=False))
  # Non-trivial running statistics, so that batch and running statistics differ.
  variables['batch_stats'] = jax.tree_util.tree_map(lambda s: s + 0.5, variables['batch_stats'])
  out, updates = frozen.apply(variables, x, train=True, mutable=['batch_stats'],
                              rngs={'dropout': jax.random.key(1)})
  for a, b in zip(jax.tree_util.tree_leaves(updates['batch_stats']),
                  jax.tree_util.tree_leaves(variables['batch_stats'])):
    np.testing.assert_array_equal(a, b)
  eval_out = trained.apply(variables, x, train=False)
  np.testing.assert_allclose(out['logits'], eval_out['logits'], rtol=1e-5, atol=1e-5)
  _, moved = trained.apply(variables, x, train=True, mutable=['batch_stats'],
                           rngs={'dropout': jax.random.key(1)})
  assert any(float(jnp.abs(a - b).max()) > 1e-3 for a, b in zip(
      jax.tree_util.tree_leaves(moved['batch_stats']),
      jax.tree_util.tree_leaves(variables['batch_stats'])))


# ---------------------------------------------------------------------------
# Config errors.


@pytest.mark.parametrize('name,field,value,expected', [
    ('deeplab_v1', 'backbone', 'resnet50',
     "model.backbone='resnet50' is not valid for deeplab_v1; choose one of "
     "['vgg16', 'vgg16_bn', 'vgg19', 'vgg19_bn']"),
    ('deeplab_v2_aspp_s', 'output_stride', 16,
     'model.output_stride=16 is not valid for deeplab_v2_aspp_s; choose one of [8]'),
    ('deeplab_v2_aspp_l', 'atrous_rates', (6, 12),
     "model.atrous_rates=(6, 12) must be () (the paper's (6, 12, 18, 24)) or 4 integers "
     ">= 1 for deeplab_v2_aspp_l"),
    ('deeplab_v3', 'input_scales', (0.5, 1.0),
     'model.input_scales=(0.5, 1.0) must be () or positive scales starting with 1.0, '
     'e.g. (1.0, 0.75, 0.5)'),
    ('deeplab_v1_largefov', 'freeze_bn', True,
     'model.freeze_bn=True is not supported by deeplab_v1_largefov (VGG fc6/fc7 dropout '
     'and BatchNorm share the train flag); use False'),
    ('deeplab_v3', 'upsampling', 'bilinear',
     "unknown model config field(s) ['upsampling'] for model.name='deeplab_v3'; known "
     "fields are ['atrous_rates', 'aux_loss', 'backbone', 'dropout_rate', 'dtype', "
     "'fc_init', 'freeze_bn', 'input_scales', 'name', 'output_stride', 'remat', "
     "'stage_width_multipliers', 'stem_stride', 'width_multiplier']"),
])
def test_bad_deeplab_values_are_named(name, field, value, expected):
  config = models.default_model_config(name)
  config.unlock()
  config[field] = value
  with pytest.raises(ValueError) as error:
    models.build_model(config, num_classes=21)
  assert str(error.value) == expected


# ---------------------------------------------------------------------------
# fc6/fc7 initialisation: N(0, 0.01) as the papers (fine-tuning) or He (from scratch).


@pytest.mark.parametrize('name,fc6,fc7,fc8', [
    ('deeplab_v1_largefov', ('backbone', 'fc6'), ('backbone', 'fc7'), ('fc8',)),
    ('deeplab_v2_aspp_s', ('aspp_0', 'fc6'), ('aspp_0', 'fc7'), ('aspp_0', 'fc8')),
])
def test_fc_init_sets_fc6_fc7_and_leaves_fc8_small(name, fc6, fc7, fc8):
  stds = {}
  for fc_init in ('normal', 'he'):
    model = models.build_model(tiny_config(name, fc_init=fc_init, width_multiplier=0.25),
                               num_classes=NUM_CLASSES)
    params = model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)), train=False)['params']
    kernel = lambda path: np.asarray(params[path[0]][path[1]]['kernel'] if len(path) == 2
                                     else params[path[0]]['kernel'])
    stds[fc_init] = {k: (kernel(p).std(), int(np.prod(kernel(p).shape[:-1])))
                     for k, p in (('fc6', fc6), ('fc7', fc7), ('fc8', fc8))}
  for layer in ('fc6', 'fc7'):
    std, fan_in = stds['normal'][layer]
    assert abs(std - 0.01) < 0.001, (layer, std)
    std, fan_in = stds['he'][layer]
    assert abs(std / math.sqrt(2.0 / fan_in) - 1) < 0.1, (layer, std, fan_in)
  for fc_init in ('normal', 'he'):
    assert abs(stds[fc_init]['fc8'][0] - 0.01) < 0.002, stds[fc_init]['fc8']


def test_bad_fc_init_is_named():
  with pytest.raises(ValueError, match=r"model.fc_init='xavier'.*\['he', 'normal'\]"):
    models.validate_model_config(tiny_config('deeplab_v2_aspp_s', fc_init='xavier'))
