"""segjax.models.fcn_resnet (torchvision's fcn_resnet50/101): layout, output sizes, frozen BN.

Number-for-number parity with torchvision is in tests/test_convert.py."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from segjax import models


def _model(**fields):
  c = models.default_model_config('fcn_resnet')
  c.backbone, c.width_multiplier = 'resnet18', 1 / 8
  for k, v in fields.items():
    c[k] = v
  return models.build_model(c, num_classes=3)


def test_layout_mirrors_torchvision():
  model = _model(backbone='resnet50', width_multiplier=1.0, aux_loss=True)
  x = jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32)
  params = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), x)['params']
  assert set(params) == {'backbone', 'classifier', 'aux_classifier'}
  # FCNHead(2048 -> 512 -> classes) on res5, FCNHead(1024 -> 256 -> classes) on res4.
  assert params['classifier']['conv']['kernel'].shape == (3, 3, 2048, 512)
  assert params['classifier']['classifier']['kernel'].shape == (1, 1, 512, 3)
  assert params['aux_classifier']['conv']['kernel'].shape == (3, 3, 1024, 256)
  assert 'bias' not in params['classifier']['conv']


@pytest.mark.parametrize('output_stride', [8, 16])
def test_output_sizes(output_stride):
  model = _model(output_stride=output_stride, aux_loss=True)
  x = jnp.zeros((2, 50, 38, 3))
  out = jax.eval_shape(lambda x: model.init_with_output(jax.random.key(0), x, train=False)[0], x)
  coarse = (-(-50 // output_stride), -(-38 // output_stride))
  assert out['coarse_logits'].shape == (2, *coarse, 3)
  assert out['logits'].shape == out['aux_logits'].shape == (2, 50, 38, 3)


def test_frozen_bn_keeps_statistics_and_dropout_still_acts():
  model = _model(freeze_bn=True, dropout_rate=0.5)
  x = jax.random.normal(jax.random.key(1), (2, 32, 32, 3))
  variables = model.init(jax.random.key(0), x, train=False)
  run = lambda key: model.apply(variables, x, train=True, rngs={'dropout': key},
                                mutable=['batch_stats'])
  (out_a, updates), (out_b, _) = run(jax.random.key(2)), run(jax.random.key(3))
  jax.tree_util.tree_map(np.testing.assert_array_equal, updates['batch_stats'],
                         variables['batch_stats'])
  # The classifier's dropout follows `train`, not the frozen BatchNorm flag.
  assert not np.allclose(out_a['logits'], out_b['logits'])
  eval_out = model.apply(variables, x, train=False)
  no_dropout = _model(freeze_bn=True, dropout_rate=0.0)
  np.testing.assert_allclose(
      no_dropout.apply(variables, x, train=True, mutable=['batch_stats'])[0]['logits'],
      eval_out['logits'], rtol=1e-5, atol=1e-5)
