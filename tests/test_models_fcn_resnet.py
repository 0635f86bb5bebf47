"""segjax.models.fcn_resnet (torchvision's fcn_resnet50/101): layout, output sizes, frozen BN.

Number-for-number parity with torchvision is in tests/test_convert.py."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from segjax import models


def _model(num_classes=3, **fields):
  c = models.default_model_config('fcn_resnet')
  c.backbone, c.width_multiplier = 'resnet18', 1 / 8
  for k, v in fields.items():
    c[k] = v
  return models.build_model(c, num_classes=num_classes)


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


def test_inference_temporaries_lower_with_stored_block_outputs_and_ordered_winograd_chunks(
    monkeypatch):
  """FCN-ResNet50 inference: XLA computed the Winograd convs' transformed kernels and
  input chunks early (`layers.after` orders them after their input and the previous
  chunk) and recomputed each block's output inside the next block's residual add,
  keeping a stage's conv outputs alive (`layers.computed_once`). Measured at 1x160x160:
  79.5 MB of temporaries, 132 MB without both (2x320x320: 115 against 227 MB)."""
  from segjax.models import layers
  model = _model(backbone='resnet50', width_multiplier=1.0, num_classes=21)
  x = jax.ShapeDtypeStruct((1, 160, 160, 3), jnp.float32)
  variables = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), x)

  def temporaries():
    jax.clear_caches()                               # trace again under the patches
    apply = lambda v, x: model.apply(v, x, train=False)  # noqa: E731
    with layers.conv_weight_grad('tap_matmuls'):
      compiled = jax.jit(apply).lower(variables, x).compile()
    return compiled.memory_analysis().temp_size_in_bytes / 2**20

  ours = temporaries()
  monkeypatch.setattr(layers, 'computed_once', lambda v: v)
  monkeypatch.setattr(layers, 'after', lambda dy, *arrays: list(arrays))
  untied = temporaries()
  assert ours <= 0.7 * untied, (ours, untied)
