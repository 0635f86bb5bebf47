"""Tests for the registries, config validation and build_model in segjax.models."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from segjax import models
from segjax.benchmarks import measure


def test_default_model_config():
  c = models.default_model_config()
  assert c.to_dict() == {
      'name': 'fcn8s', 'backbone': 'vgg16', 'width_multiplier': 1.0,
      'output_stride': 32, 'upsampling': 'deconv', 'aux_loss': False,
      'fc_kernel_size': 7, 'dtype': 'float32', 'dropout_rate': 0.5, 'fc_init': 'normal',
      'stem_stride': 4, 'stage_width_multipliers': (), 'remat': False}
  models.validate_model_config(c)


def test_registries():
  assert set(models.BACKBONES) == {'vgg16', 'vgg16_bn', 'vgg19', 'vgg19_bn', 'resnet18',
                                   'resnet34', 'resnet50', 'resnet101', 'resnet152'}
  assert set(models.MODELS) == {
      'fcn32s', 'fcn16s', 'fcn8s', 'deeplab_v1', 'deeplab_v1_largefov', 'deeplab_v1_msc',
      'deeplab_v1_msc_largefov', 'deeplab_v2_aspp_s', 'deeplab_v2_aspp_l',
      'deeplab_v2_largefov', 'deeplab_v2_7x7', 'deeplab_v3',
      'deeplab_v3plus', 'fcn_resnet'}
  assert models.UPSAMPLING == ('bilinear', 'deconv', 'deconv_frozen')


@pytest.mark.parametrize('name,backbone', [
    (name, backbone) for name in sorted(models.MODELS)
    for backbone in models.supported_backbones(name)])
def test_every_registry_name_builds(name, backbone):
  c = models.default_model_config(name)
  c.backbone, c.width_multiplier = backbone, 1 / 16
  if 'fc_kernel_size' in c:
    c.fc_kernel_size = 1
  model = models.build_model(c, num_classes=3, bn_axis_name='batch')
  x = jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32)
  out = jax.eval_shape(
      lambda x: model.init_with_output(jax.random.key(0), x, train=False)[0], x)
  assert out['logits'].shape == (1, 32, 32, 3)
  assert model.backbone.bn_axis_name == 'batch' and model.bn_axis_name == 'batch'


@pytest.mark.parametrize('field,value,expected', [
    ('name', 'fcn4s', "model.name='fcn4s' is not valid; choose one of ['deeplab_v1', "
                      "'deeplab_v1_largefov', 'deeplab_v1_msc', 'deeplab_v1_msc_largefov', "
                      "'deeplab_v2_7x7', 'deeplab_v2_aspp_l', 'deeplab_v2_aspp_s', "
                      "'deeplab_v2_largefov', 'deeplab_v3', "
                      "'deeplab_v3plus', 'fcn16s', 'fcn32s', 'fcn8s', 'fcn_resnet']"),
    ('backbone', 'resnet19', "model.backbone='resnet19' is not valid; choose one of "
                             "['resnet101', 'resnet152', 'resnet18', 'resnet34', 'resnet50', "
                             "'vgg16', 'vgg16_bn', 'vgg19', 'vgg19_bn']"),
    ('upsampling', 'unpool', "model.upsampling='unpool' is not valid; choose one of "
                             "['bilinear', 'deconv', 'deconv_frozen']"),
    ('output_stride', 4, 'model.output_stride=4 is not valid; choose one of [8, 16, 32]'),
    ('dtype', 'float64', "model.dtype='float64' is not valid; choose one of "
                         "['bfloat16', 'float16', 'float32']"),
    ('width_multiplier', 0.0, 'model.width_multiplier=0.0 must be a number > 0'),
    ('fc_kernel_size', 0, 'model.fc_kernel_size=0 must be an integer >= 1'),
    ('dropout_rate', 1.0, 'model.dropout_rate=1.0 must be in [0, 1)'),
    ('stem_stride', 3, 'model.stem_stride=3 is not valid; choose one of [1, 2, 4]'),
    ('stem_stride', 2, "model.stem_stride=2 needs a ResNet backbone; vgg16 has no stem to "
                       "change (use 4)"),
    ('stage_width_multipliers', (0.5,) * 4,
     'model.stage_width_multipliers=(0.5, 0.5, 0.5, 0.5) needs a ResNet backbone; use () '
     'with vgg16'),
    ('remat', True, 'model.remat=True needs a ResNet backbone (it rematerialises the '
                    'residual blocks); use False with vgg16'),
])
def test_bad_values_are_named_with_valid_choices(field, value, expected):
  c = models.default_model_config()
  c.unlock()
  c[field] = value
  with pytest.raises(ValueError) as err:
    models.build_model(c, num_classes=21)  # build_model validates first
  assert str(err.value) == expected


def _small_stem_outputs(c):
  """build_model(c) and its output shapes on a 64 x 48 image, without computing them."""
  model = models.build_model(c, num_classes=3)
  x = jax.ShapeDtypeStruct((1, 64, 48, 3), jnp.float32)
  return model, jax.eval_shape(
      lambda x: model.init_with_output(jax.random.key(0), x, train=False)[0], x)


@pytest.mark.parametrize('name', ['fcn32s', 'fcn8s'])
@pytest.mark.parametrize('stem_stride', [1, 2])
def test_fcn_with_a_small_stem_keeps_the_input_size(name, stem_stride):
  c = models.default_model_config(name)
  c.backbone, c.width_multiplier, c.stem_stride = 'resnet18', 1 / 16, stem_stride
  model, out = _small_stem_outputs(c)
  assert out['logits'].shape == (1, 64, 48, 3)
  assert model.backbone.feature_strides()['res5'] == 8 * stem_stride
  c.output_stride = 16  # the dilation pattern of output stride 16, at the finer grid
  model, out = _small_stem_outputs(c)
  assert out['logits'].shape == (1, 64, 48, 3)
  assert model.backbone.feature_strides()['res5'] == 4 * stem_stride


@pytest.mark.parametrize('name', ['deeplab_v2_largefov', 'deeplab_v2_aspp_l', 'deeplab_v3',
                                  'deeplab_v3plus'])
@pytest.mark.parametrize('stem_stride', [1, 2])
def test_deeplab_with_a_small_stem_has_finer_coarse_logits(name, stem_stride):
  c = models.default_model_config(name)
  c.backbone, c.width_multiplier, c.stem_stride = 'resnet18', 1 / 16, stem_stride
  _, out = _small_stem_outputs(c)
  stride = models.coarse_logits_stride(c)
  assert stride == (stem_stride if name == 'deeplab_v3plus' else 2 * stem_stride)
  assert out['coarse_logits'].shape == (1, 64 // stride, 48 // stride, 3)
  assert out['logits'].shape == (1, 64, 48, 3)
  c.backbone = 'vgg16_bn'
  with pytest.raises(ValueError, match=f'model.stem_stride={stem_stride} needs a ResNet'):
    models.build_model(c, num_classes=3)


@pytest.mark.parametrize('value', [(0.5, 0.5, 0.5), (0.5, 0.5, 0.0, 0.5),
                                   (0.5, True, 0.5, 0.5)])
def test_bad_stage_width_multipliers_are_named(value):
  c = models.default_model_config('fcn8s')
  c.backbone, c.stage_width_multipliers = 'resnet18', value
  with pytest.raises(ValueError) as err:
    models.build_model(c, num_classes=3)
  assert str(err.value) == (f'model.stage_width_multipliers={value!r} must be () or 4 '
                            'numbers > 0 (res2..res5)')


@pytest.mark.parametrize('name', ['fcn8s', 'deeplab_v3plus'])
def test_stage_width_multipliers_widen_only_the_stages(name):
  c = models.default_model_config(name)
  c.backbone, c.width_multiplier, c.stem_stride = 'resnet18', 1 / 8, 1
  c.stage_width_multipliers = (1 / 8, 1 / 8, 1 / 4, 1 / 2)
  model, out = _small_stem_outputs(c)
  assert out['logits'].shape == (1, 64, 48, 3)
  assert model.backbone.feature_channels() == {'stem': 8, 'res2': 8, 'res3': 16,
                                               'res4': 64, 'res5': 256}
  params = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False),
                          jnp.zeros((1, 64, 48, 3)))['params']['backbone']
  assert params['conv1']['kernel'].shape == (7, 7, 3, 8)
  assert params['layer3_0']['conv1']['kernel'].shape == (3, 3, 16, 64)
  assert params['layer4_1']['conv2']['kernel'].shape == (3, 3, 256, 256)


def test_unknown_and_missing_fields():
  c = models.default_model_config()
  c.unlock()
  c.output_strid = 16
  with pytest.raises(ValueError, match=r"unknown model config field\(s\) \['output_strid'\]"):
    models.validate_model_config(c)
  partial = ml_collections.ConfigDict({'name': 'fcn8s', 'backbone': 'vgg16'})
  with pytest.raises(ValueError, match=r"missing field\(s\) \['aux_loss', "):
    models.validate_model_config(partial)
  with pytest.raises(ValueError, match='num_classes=0'):
    models.build_model(models.default_model_config(), num_classes=0)


@pytest.mark.parametrize('name,freeze_bn', [('fcn8s', False), ('deeplab_v3', False),
                                            ('fcn_resnet', False), ('deeplab_v3', True)])
def test_remat_keeps_parameters_outputs_and_gradients(name, freeze_bn):
  """model.remat=True recomputes the ResNet blocks in the backward pass: the same
  parameter tree, outputs, BatchNorm statistics and gradients as without it, and the
  compiled gradient really computes the blocks again."""
  results, flops = {}, {}
  # 96x96, not smaller: at 32x32 the forward's convs (not differentiated) took other
  # kernels than their recomputation in the backward, and BatchNorm over 2 values per
  # channel (ResNet-18's layer4, DeepLabV3's pooled ASPP branch) magnified that rounding
  # to 0.9% of the largest gradient; at 96x96 FCN-ResNet's and DeepLabV3's gradients
  # were bit-identical (checked).
  x = jax.random.normal(jax.random.key(1), (2, 96, 96, 3))
  for remat in (False, True):
    c = models.default_model_config(name)
    c.backbone, c.width_multiplier, c.remat = 'resnet18', 1 / 16, remat
    if freeze_bn:  # BatchNorm in inference mode, the convs still trained
      c.freeze_bn = True
    if 'fc_kernel_size' in c:
      c.fc_kernel_size = 1
    c.dropout_rate = 0.0
    model = models.build_model(c, num_classes=3)
    variables = model.init(jax.random.key(0), x, train=False)

    def loss(params, model=model, variables=variables):
      out, updates = model.apply({**variables, 'params': params}, x, train=True,
                                 mutable=['batch_stats'])
      return jnp.sum(out['logits'] ** 2), updates

    grad_fn = jax.jit(jax.grad(loss, has_aux=True))
    grads, updates = grad_fn(variables['params'])
    results[remat] = variables, grads, updates
    flops[remat] = measure.analysed_flops(grad_fn.lower(variables['params']).compile())
  # The backward runs the blocks' forward again (13-35% more FLOPs at this size).
  assert flops[True] > 1.1 * flops[False], flops
  (v0, g0, u0), (v1, g1, u1) = results[False], results[True]
  assert jax.tree.structure(v0) == jax.tree.structure(v1)
  jax.tree.map(np.testing.assert_array_equal, v0, v1)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), u1, u0)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4), g1, g0)
