"""The train step's DeepLab options: subsampled labels, multi-scale losses, frozen BatchNorm."""

import re

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from segjax import base_config, config_validation, models
from segjax.train import steps
from segjax.train.losses import cross_entropy_sum
from segjax.train.state import TrainState, all_finite, create_train_state

NUM_CLASSES = 4


def _state(name, tx=None, **overrides):
  config = models.default_model_config(name)
  config.backbone, config.width_multiplier, config.dropout_rate = 'resnet18', 1 / 16, 0.0
  config.update(overrides)
  model = models.build_model(config, num_classes=NUM_CLASSES)
  tx = tx or optax.sgd(0.1, momentum=0.9)
  return jax.jit(lambda key: create_train_state(model, tx, key, (1, 32, 32, 3)))(
      jax.random.key(0))


def _train_outputs(state, images):
  """The model's train-mode outputs with the dropout key train_step uses."""
  rng = jax.random.fold_in(state.rng, state.step)
  return jax.jit(lambda s, x: s.apply_fn(
      {'params': s.params, 'batch_stats': s.batch_stats}, x, train=True,
      mutable=['batch_stats'], rngs={'dropout': rng})[0])(state, images)


def _batch(seed=0, hw=(32, 32)):
  rng = np.random.default_rng(seed)
  label = rng.integers(0, NUM_CLASSES, (2,) + hw).astype(np.int32)
  label[0, :3] = 255
  return {'image': rng.normal(size=(2,) + hw + (3,)).astype(np.float32), 'label': label}


def _mean_ce(logits, labels):
  loss, count = cross_entropy_sum(logits, labels)
  return loss / count


def test_subsample_labels_takes_the_label_at_each_logit_centre():
  labels = jnp.arange(2 * 20 * 17).reshape(2, 20, 17)
  got = steps.subsample_labels(labels, 8, (3, 3))  # ceil(20/8), ceil(17/8)
  # Rows 4, 12, 19 (20 clamped to H-1), columns 4, 12, 16 (20 clamped to W-1).
  want = labels[:, [4, 12, 19]][:, :, [4, 12, 16]]
  np.testing.assert_array_equal(got, want)
  assert int(got[1, 2, 2]) == 20 * 17 + 19 * 17 + 16


def test_downsampled_label_loss_is_the_coarse_cross_entropy():
  state = _state('deeplab_v2_aspp_s')
  batch = _batch()
  _, metrics = jax.jit(lambda s, b: steps.train_step(s, b, label_stride=8))(state, batch)
  out = _train_outputs(state, batch['image'])
  coarse_labels = jnp.asarray(batch['label'])[:, 4::8, 4::8]     # 32 = 4 * 8
  want = _mean_ce(out['coarse_logits'], coarse_labels)
  np.testing.assert_allclose(metrics['loss'], want, rtol=1e-5)
  np.testing.assert_allclose(metrics['main_loss'], want, rtol=1e-5)
  _, upsampled = jax.jit(steps.train_step)(state, batch)
  np.testing.assert_allclose(upsampled['loss'], _mean_ce(out['logits'], batch['label']),
                             rtol=1e-5)


def test_multi_scale_training_adds_one_loss_per_scale():
  state = _state('deeplab_v3', input_scales=(1.0, 0.75, 0.5), aux_loss=True)
  batch = _batch(1)
  _, metrics = jax.jit(lambda s, b: steps.train_step(s, b, aux_loss_weight=0.4))(state, batch)
  out = _train_outputs(state, batch['image'])
  assert len(out['scale_logits']) == 3
  main = _mean_ce(out['logits'], batch['label'])
  scales = sum(_mean_ce(s, batch['label']) for s in out['scale_logits'])
  aux = _mean_ce(out['aux_logits'], batch['label'])
  np.testing.assert_allclose(metrics['main_loss'], main, rtol=1e-5)
  np.testing.assert_allclose(metrics['loss'], main + scales + 0.4 * aux, rtol=1e-5)


@pytest.mark.parametrize('tx', [optax.sgd(0.1, momentum=0.9),
                                optax.adamw(1e-2, weight_decay=1e-4,
                                            mask=lambda p: jax.tree_util.tree_map(
                                                lambda x: x.ndim > 1, p))])
def test_frozen_batch_norm_keeps_statistics_and_affine_parameters(tx):
  # "Frozen" = running statistics used and never updated (the model) AND BatchNorm
  # scale/bias never updated (the step zeroes their gradients; decay is masked off them).
  state = _state('deeplab_v3plus', tx=tx, freeze_bn=True, aux_loss=True)
  # Running variances of 2 (not the init's 1), so an update would show; means stay 0
  # so that no ReLU dies and every other parameter gets a gradient.
  state = state.replace(batch_stats=jax.tree_util.tree_map_with_path(
      lambda path, s: s + 1.0 if path[-1].key == 'var' else s, state.batch_stats))
  new = state
  for seed in range(2):
    new, metrics = jax.jit(lambda s, b: steps.train_step(s, b, freeze_bn=True))(
        new, _batch(seed))
  assert float(metrics['grad_norm']) > 0
  for a, b in zip(jax.tree_util.tree_leaves(new.batch_stats),
                  jax.tree_util.tree_leaves(state.batch_stats)):
    np.testing.assert_array_equal(a, b)
  old = flax.traverse_util.flatten_dict(state.params, sep='/')
  moved = flax.traverse_util.flatten_dict(new.params, sep='/')
  bn_modules = {p.rsplit('/', 1)[0]
                for p in flax.traverse_util.flatten_dict(state.batch_stats, sep='/')}
  assert len(bn_modules) > 20
  for path, value in moved.items():
    changed = not np.array_equal(value, old[path])
    assert changed == (path.rsplit('/', 1)[0] not in bn_modules), path


def test_unfrozen_batch_norm_moves():
  state = _state('deeplab_v3plus')
  new, _ = jax.jit(steps.train_step)(state, _batch())
  assert not np.array_equal(new.params['decoder_0']['bn']['scale'],
                            state.params['decoder_0']['bn']['scale'])
  assert not np.array_equal(new.batch_stats['decoder_0']['bn']['mean'],
                            state.batch_stats['decoder_0']['bn']['mean'])


def test_bind_train_step_reads_the_config():
  config = base_config.deeplab_config('deeplab_v3plus', 'digit_scenes')
  config.loss.downsample_labels = True
  config.model.freeze_bn = True
  bound = steps.bind_train_step(config, axis_name=None)
  # The preset's stride-2 stem puts v3+'s decoder (and so the labels) at stride 2.
  assert bound.keywords['label_stride'] == 2 and bound.keywords['freeze_bn'] is True
  config.model.stem_stride = 4
  assert steps.bind_train_step(config, axis_name=None).keywords['label_stride'] == 4
  fcn = base_config.fcn_config('fcn8s', 'digit_scenes')
  bound = steps.bind_train_step(fcn, axis_name=None)
  assert bound.keywords['label_stride'] is None and bound.keywords['freeze_bn'] is False
  fcn.loss.downsample_labels = True
  with pytest.raises(ValueError, match="downsample_labels=True needs a model with coarse "
                                       "logits .* not model.name='fcn8s'"):
    config_validation.validate_config(fcn)



def test_non_finite_batch_skips_the_update_but_advances_the_step():
  state = _state('fcn8s')
  batch = _batch()
  batch['image'][1, 5, 5, 0] = np.nan
  new_state, metrics = jax.jit(steps.train_step)(state, batch)
  assert int(new_state.step) == int(state.step) + 1
  assert float(metrics['nonfinite']) == 1.0 and not np.isfinite(float(metrics['loss']))
  for name in ('params', 'batch_stats', 'opt_state'):
    for a, b in zip(jax.tree_util.tree_leaves(getattr(state, name)),
                    jax.tree_util.tree_leaves(getattr(new_state, name)), strict=True):
      np.testing.assert_array_equal(a, b)
  _, metrics = jax.jit(steps.train_step)(state, _batch())
  assert float(metrics['nonfinite']) == 0.0


@pytest.mark.parametrize('bad', [None, 'grad_nan', 'grad_inf', 'loss_nan'])
def test_gated_update_is_apply_gradients_when_finite_and_a_no_op_otherwise(bad):
  tx = optax.adamw(0.1)
  params = {'a': jnp.array([1.0, -2.0]), 'b': {'kernel': jnp.ones((2, 2))}}
  state = TrainState(
      step=jnp.asarray(3, jnp.int32), params=params, batch_stats={'mean': jnp.zeros(2)},
      opt_state=tx.init(params), rng=jnp.zeros((2,), jnp.uint32), apply_fn=None, tx=tx)
  grads = {'a': jnp.array([0.5, 0.25]), 'b': {'kernel': jnp.full((2, 2), -1.0)}}
  loss = jnp.float32(0.7)
  if bad == 'grad_nan':
    grads['b']['kernel'] = grads['b']['kernel'].at[1, 0].set(jnp.nan)
  elif bad == 'grad_inf':
    grads['a'] = grads['a'].at[0].set(jnp.inf)
  elif bad == 'loss_nan':
    loss = jnp.float32(jnp.nan)
  new_stats = {'mean': jnp.ones(2)}
  gated, finite = state.apply_gradients_if_finite(grads, loss, batch_stats=new_stats)
  expected = (state.apply_gradients(grads, batch_stats=new_stats) if bad is None
              else state.replace(step=state.step + 1))
  assert bool(finite) == (bad is None)
  for a, b in zip(jax.tree_util.tree_leaves(expected), jax.tree_util.tree_leaves(gated),
                  strict=True):
    np.testing.assert_array_equal(a, b)


def _select_update(state, grads, loss):
  """The gated update as a select of the updated and the old state (before 2026-12-06)."""
  finite = all_finite(loss, grads)
  kept = state.replace(step=state.step + 1)
  return jax.tree_util.tree_map(lambda new, old: jnp.where(finite, new, old),
                                state.apply_gradients(grads), kept), finite


def test_gated_update_lets_xla_update_the_donated_state_in_place():
  """Jitted with the state donated, the gated update copies no state buffer (the select
  of both states made XLA copy the parameters and momenta at the step's start: each
  one's update read the other's old buffer)."""
  tx = optax.chain(optax.add_decayed_weights(1e-4), optax.sgd(0.01, momentum=0.9))
  params = [jnp.full((3, 3, 32, 32), 0.01) for _ in range(3)]
  state = TrainState(step=jnp.asarray(0, jnp.int32), params=params, batch_stats={},
                     opt_state=tx.init(params), rng=jnp.zeros((2,), jnp.uint32),
                     apply_fn=None, tx=tx)
  x = jnp.ones((2, 8, 8, 32))

  def loss_fn(params):
    y = x
    for w in params:
      y = jax.nn.relu(jax.lax.conv_general_dilated(y, w, (1, 1), 'SAME',
                                                   dimension_numbers=('NHWC', 'HWIO', 'NHWC')))
    return jnp.sum(y)

  def copies(update):
    def step(state):
      loss, grads = jax.value_and_grad(loss_fn)(state.params)
      return update(state, grads, loss)[0]
    hlo = jax.jit(step, donate_argnums=0).lower(state).compile().as_text()
    return len(re.findall(r'copy\(%state', hlo))

  assert copies(_select_update) >= 6               # 3 kernels and their 3 momenta
  assert copies(lambda s, g, loss: s.apply_gradients_if_finite(g, loss)) == 0


def test_call_jitted_once_returns_the_jitted_result_and_keeps_no_executable():
  from segjax.benchmarks.measure import compile_monitor
  from segjax.train.state import call_jitted_once
  monitor = compile_monitor()
  x = jnp.arange(4.0)

  def plain(v):
    return v * 2.0 + 1.0

  def once(v):
    return v * 3.0 - 1.0

  before = monitor.snapshot()[0]
  jax.jit(plain)(x)
  jax.jit(plain)(x)
  assert monitor.snapshot()[0] - before == 1  # a kept executable is reused
  before = monitor.snapshot()[0]
  np.testing.assert_array_equal(call_jitted_once(once, x), [-1.0, 2.0, 5.0, 8.0])
  np.testing.assert_array_equal(call_jitted_once(once, x), [-1.0, 2.0, 5.0, 8.0])
  assert monitor.snapshot()[0] - before == 2  # dropped after each call: compiled again
