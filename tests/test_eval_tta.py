"""Evaluation with test-time augmentation and the dense CRF (segjax.train.steps)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from segjax import base_config, config_validation, models
from segjax.evaluation.segmentation_metrics import confusion_matrix
from segjax.models import crf, layers
from segjax.train import steps
from segjax.train.state import create_train_state

NUM_CLASSES = 4
MEAN = (120.0, 110.0, 100.0)
STD = (50.0, 60.0, 70.0)


@pytest.fixture(scope='module')
def state():
  config = models.default_model_config('deeplab_v3plus')
  config.backbone, config.width_multiplier, config.output_stride = 'resnet18', 1 / 16, 16
  model = models.build_model(config, num_classes=NUM_CLASSES)
  state = jax.jit(lambda key: create_train_state(model, optax.sgd(0.1), key, (1, 32, 32, 3)))(
      jax.random.key(0))
  # Random (not zero-initialised) parameters and statistics: every pass differs.
  leaves, treedef = jax.tree_util.tree_flatten(state.params)
  keys = jax.random.split(jax.random.key(3), len(leaves))
  params = jax.tree_util.tree_unflatten(
      treedef, [0.3 * jax.random.normal(k, l.shape) for k, l in zip(keys, leaves)])
  return state.replace(params=params)


@pytest.fixture(scope='module')
def batch():
  rng = np.random.default_rng(0)
  valid = np.ones((2, 32, 40), bool)
  valid[1, 24:] = False  # padding rows of the second image
  return {'image': rng.normal(size=(2, 32, 40, 3)).astype(np.float32),
          'label': rng.integers(0, NUM_CLASSES, (2, 32, 40)).astype(np.int32),
          'valid': valid}


@jax.jit
def _softmax_logits(state, images):
  return jax.nn.softmax(steps.predict(state, images), axis=-1)


_predict = jax.jit(steps.predict)


def test_flip_tta_is_the_mean_of_the_two_passes(state, batch):
  x = jnp.asarray(batch['image'])
  plain = _softmax_logits(state, x)
  mirrored = _softmax_logits(state, x[:, :, ::-1])[:, :, ::-1]
  assert float(jnp.abs(plain - mirrored).max()) > 1e-3  # the model is not symmetric
  got = jax.jit(functools.partial(steps.predict_probs, flip=True))(state, x)
  np.testing.assert_allclose(got, (plain + mirrored) / 2, rtol=1e-5, atol=1e-6)


def test_multi_scale_tta_resizes_in_and_out_and_averages(state, batch):
  x = jnp.asarray(batch['image'])
  want = []
  for size in ((16, 20), (32, 40), (48, 60)):  # scales 0.5, 1, 1.5 of 32 x 40
    logits = _predict(state, layers.bilinear_resize(x, size, align_corners=False))
    want.append(jax.nn.softmax(layers.bilinear_resize(logits, (32, 40), align_corners=False)))
  got = jax.jit(functools.partial(steps.predict_probs, scales=(0.5, 1.0, 1.5)))(state, x)
  np.testing.assert_allclose(got, sum(want) / 3, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(jnp.sum(got, -1), 1.0, rtol=1e-5)


def test_eval_step_without_options_is_the_argmax_of_the_logits(state, batch):
  predictions = jnp.argmax(_predict(state, jnp.asarray(batch['image'])), -1)
  want = confusion_matrix(predictions, batch['label'], batch['valid'], NUM_CLASSES)
  got = jax.jit(functools.partial(steps.eval_step, num_classes=NUM_CLASSES))(state, batch)
  np.testing.assert_array_equal(got, want)
  assert int(got.sum()) == int(batch['valid'].sum())


def test_eval_step_with_tta_uses_the_averaged_probabilities(state, batch):
  probs = jax.jit(functools.partial(steps.predict_probs, scales=(0.75, 1.0), flip=True))(
      state, jnp.asarray(batch['image']))
  want = confusion_matrix(jnp.argmax(probs, -1), batch['label'], batch['valid'], NUM_CLASSES)
  got = jax.jit(functools.partial(steps.eval_step, num_classes=NUM_CLASSES,
                                  tta_scales=(0.75, 1.0), tta_flip=True))(state, batch)
  np.testing.assert_array_equal(got, want)


def test_crf_gets_the_unnormalised_image_and_log_probabilities(state, batch, monkeypatch):
  seen = {}

  def fake_crf(cfg, logits, image):
    seen.update(cfg=cfg, logits=logits, image=image)
    return jax.nn.softmax(logits, axis=-1)

  monkeypatch.setattr(crf, 'apply_crf', fake_crf)
  cfg = crf.default_crf_config()
  cfg.enabled = True
  steps.eval_step(state, batch, num_classes=NUM_CLASSES, crf_config=cfg, mean=MEAN, std=STD)
  valid = batch['valid']
  rgb = batch['image'] * np.asarray(STD) + np.asarray(MEAN)
  np.testing.assert_allclose(np.asarray(seen['image'])[valid], rgb[valid], atol=1e-4)
  assert np.all(np.asarray(seen['image'])[~valid] == steps._CRF_PAD_COLOUR)
  probs = _softmax_logits(state, jnp.asarray(batch['image']))
  np.testing.assert_allclose(np.asarray(seen['logits'])[valid],
                             np.log(np.asarray(probs))[valid], rtol=1e-4, atol=1e-5)
  np.testing.assert_array_equal(np.asarray(seen['logits'])[~valid], 0.0)
  assert seen['cfg'] is cfg


def test_eval_step_with_crf_is_the_argmax_of_the_refined_probabilities(state, batch):
  cfg = crf.default_crf_config()
  cfg.enabled, cfg.num_iterations = True, 5
  cfg.w1, cfg.w2 = 20.0, 20.0  # strong pairwise terms: the CRF changes predictions
  images = jnp.asarray(batch['image'])
  probs = _softmax_logits(state, images)
  rgb = images * jnp.asarray(STD) + jnp.asarray(MEAN)
  rgb = jnp.where(batch['valid'][..., None], rgb, steps._CRF_PAD_COLOUR)
  logits = jnp.where(batch['valid'][..., None], jnp.log(probs), 0.0)
  refined = crf.apply_crf(cfg, logits, rgb)
  want = confusion_matrix(jnp.argmax(refined, -1), batch['label'], batch['valid'], NUM_CLASSES)
  plain = jax.jit(functools.partial(steps.eval_step, num_classes=NUM_CLASSES))(state, batch)
  got = jax.jit(lambda s, b: steps.eval_step(s, b, num_classes=NUM_CLASSES, crf_config=cfg,
                                             mean=MEAN, std=STD))(state, batch)
  np.testing.assert_array_equal(got, want)
  assert not np.array_equal(got, plain)
  assert int(got.sum()) == int(batch['valid'].sum())


def test_bind_eval_step_reads_config_eval_and_dataset_normalisation():
  config = base_config.deeplab_config('deeplab_v3', 'digit_scenes')
  config.eval.tta.scales = (0.5, 1.0)
  config.eval.crf.enabled = True
  bound = steps.bind_eval_step(config)
  assert bound.keywords['tta_scales'] == (0.5, 1.0)
  assert bound.keywords['tta_flip'] is False
  assert bound.keywords['crf_config'].enabled is True
  assert bound.keywords['mean'] == tuple(config.dataset.mean)
  assert bound.keywords['std'] == tuple(config.dataset.std)


@pytest.mark.parametrize('field,value,match', [
    ('tta.scales', (), 'config.eval.tta.scales=()'),
    ('tta.scales', (1.0, -0.5), r'config.eval.tta.scales=\(1.0, -0.5\)'),
    ('tta.flip', True, 'config.eval.tta.flip=True but config.dataset.hflip=False'),
    ('crf.method', 'slow', r"config.eval.crf.method='slow' is not valid; choose one of "
                           r"\['fast', 'exact'\]"),
    ('crf.num_iterations', 0, 'config.eval.crf.num_iterations=0'),
])
def test_bad_eval_values_raise_before_anything_is_built(field, value, match):
  config = base_config.deeplab_config('deeplab_v3plus', 'digit_scenes')
  section, name = field.split('.')
  config.eval[section][name] = value
  with pytest.raises(ValueError, match=match):
    config_validation.validate_config(config)
