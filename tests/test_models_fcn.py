"""Tests for segjax.models.fcn (built through the registry, as the trainer does)."""

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from segjax import models
from segjax.models import layers

NUM_CLASSES = 5


def tiny_config(**overrides):
  config = models.default_model_config()
  config.width_multiplier = 1 / 16
  config.fc_kernel_size = 3
  config.update(overrides)
  return config


def random_params(variables, scale=0.1):
  """Replace every parameter (zero-initialised score layers included) by noise."""
  leaves, treedef = jax.tree_util.tree_flatten(variables['params'])
  keys = jax.random.split(jax.random.key(7), len(leaves))
  leaves = [scale * jax.random.normal(k, l.shape) for k, l in zip(keys, leaves)]
  return {**variables, 'params': jax.tree_util.tree_unflatten(treedef, leaves)}


def abstract_params(model, x):
  return jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), x)['params']


@pytest.mark.parametrize('name', ['fcn32s', 'fcn16s', 'fcn8s'])
@pytest.mark.parametrize('backbone', ['vgg16', 'vgg16_bn', 'resnet18', 'resnet50'])
@pytest.mark.parametrize('output_stride', [8, 16, 32])
def test_output_shapes_any_input_size(name, backbone, output_stride):
  model = models.build_model(
      tiny_config(name=name, backbone=backbone, output_stride=output_stride,
                  aux_loss=True, dtype='bfloat16'),
      num_classes=NUM_CLASSES)
  for hw in ((64, 64), (50, 38)):
    x = jax.ShapeDtypeStruct((2,) + hw + (3,), jnp.float32)
    out = jax.eval_shape(
        lambda x: model.init_with_output(jax.random.key(0), x, train=False)[0], x)
    assert set(out) == {'logits', 'aux_logits'}
    for v in out.values():
      assert v.shape == (2,) + hw + (NUM_CLASSES,)
      assert v.dtype == jnp.float32


def test_score_layers_and_upsampling_params():
  x = jnp.zeros((1, 64, 64, 3))
  model = models.build_model(tiny_config(name='fcn8s', upsampling='deconv'),
                             num_classes=NUM_CLASSES)
  params = model.init(jax.random.key(0), x, train=False)['params']
  assert set(params) == {'backbone', 'score_fr', 'score_pool4', 'score_pool3',
                         'upscore2', 'upscore_pool4', 'upscore8'}
  assert params['upscore8']['kernel'].shape == (16, 16, NUM_CLASSES, NUM_CLASSES)
  assert params['upscore2']['kernel'].shape == (4, 4, NUM_CLASSES, NUM_CLASSES)
  for name in ('score_fr', 'score_pool4', 'score_pool3'):  # FCN §4.1-4.2: zero init
    assert float(jnp.abs(params[name]['kernel']).max()) == 0.0
  frozen = models.build_model(tiny_config(name='fcn32s', upsampling='deconv_frozen'),
                              num_classes=NUM_CLASSES)
  assert set(abstract_params(frozen, x)) == {
      'backbone', 'score_fr'}
  # Dilated backbone: the skips share the top's stride, so no upsampling layers
  # but the final one.
  dilated = models.build_model(tiny_config(name='fcn8s', backbone='resnet18',
                                           output_stride=8), num_classes=NUM_CLASSES)
  assert set(abstract_params(dilated, x)) == {
      'backbone', 'score_fr', 'score_pool4', 'score_pool3', 'upscore8'}


def test_fcn8s_fusion_matches_hand_computation():
  # Recompute FCN-8s from the backbone's features with layers.bilinear_resize and
  # explicit crops, on an input that is not a multiple of 32.
  x = jax.random.normal(jax.random.key(0), (1, 50, 38, 3))
  model = models.build_model(tiny_config(name='fcn8s', upsampling='bilinear'),
                             num_classes=NUM_CLASSES)
  variables = random_params(model.init(jax.random.key(0), x, train=False))
  logits = model.apply(variables, x, train=False)['logits']
  feats = model.apply(variables, x, train=False,
                      method=lambda m, x, train: m.backbone(x, train=train))
  p = variables['params']

  def score(name, f):
    return jnp.einsum('bhwc,ck->bhwk', f, p[name]['kernel'][0, 0],
                      precision='highest') + p[name]['bias']

  def up(y, f):
    return layers.bilinear_resize(y, (y.shape[1] * f, y.shape[2] * f), align_corners=False)

  fr = score('score_fr', feats['fc7'])                 # 2 x 2 (ceil(50/32), ceil(38/32))
  p4 = score('score_pool4', feats['pool4'])            # 4 x 3
  p3 = score('score_pool3', feats['pool3'])            # 7 x 5
  assert fr.shape[1:3] == (2, 2) and p4.shape[1:3] == (4, 3) and p3.shape[1:3] == (7, 5)
  y = up(fr, 2)[:, :4, :3] + p4
  y = up(y, 2)[:, :7, :5] + p3
  want = up(y, 8)[:, :50, :38]
  np.testing.assert_allclose(logits, want, rtol=1e-4, atol=1e-5)


def test_frozen_deconv_equals_bilinear_on_interior():
  x = jax.random.normal(jax.random.key(0), (1, 64, 64, 3))
  build = lambda up: models.build_model(tiny_config(name='fcn32s', upsampling=up),
                                        num_classes=NUM_CLASSES)
  bilinear, frozen = build('bilinear'), build('deconv_frozen')
  variables = random_params(bilinear.init(jax.random.key(0), x, train=False))
  a = bilinear.apply(variables, x, train=False)['logits']
  b = frozen.apply(variables, x, train=False)['logits']
  assert float(jnp.abs(a).max()) > 1e-3
  np.testing.assert_allclose(a[:, 16:-16, 16:-16], b[:, 16:-16, 16:-16], atol=1e-5)


def test_train_step_shapes_rngs_and_gradients():
  x = jax.random.normal(jax.random.key(0), (2, 40, 40, 3))
  model = models.build_model(tiny_config(name='fcn8s', backbone='resnet18', aux_loss=True),
                             num_classes=NUM_CLASSES)
  variables = jax.jit(lambda x: model.init(jax.random.key(0), x, train=False))(x)
  assert set(variables) == {'params', 'batch_stats'}
  assert 'aux_classifier' in variables['params']
  variables = {**variables, 'params': {**variables['params'],
                                       'score_fr': random_params(
                                           {'params': variables['params']['score_fr']})['params']}}

  def loss(params):
    out, updates = model.apply({**variables, 'params': params}, x, train=True,
                               rngs={'dropout': jax.random.key(1)}, mutable=['batch_stats'])
    return jnp.mean(out['logits'] ** 2) + 0.4 * jnp.mean(out['aux_logits'] ** 2), updates

  grads, updates = jax.jit(jax.grad(loss, has_aux=True))(variables['params'])
  assert jax.tree_util.tree_structure(updates['batch_stats']) == \
      jax.tree_util.tree_structure(variables['batch_stats'])
  flat = flax.traverse_util.flatten_dict(grads, sep='/')
  for path in ('upscore8/kernel', 'score_fr/kernel', 'backbone/conv1/kernel',
               'aux_classifier/classifier/kernel'):
    assert float(jnp.abs(flat[path]).max()) > 0, path
