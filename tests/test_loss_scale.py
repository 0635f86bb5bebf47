"""float16 training with dynamic loss scaling (segjax.train.loss_scale): the update rule,
gradients that underflow without it, overflow handling, checkpoints, and a trained run."""

import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from segjax import base_config
from segjax.train import checkpoints, loss_scale, metric_writer, steps, trainer
from test_loop import CONFIG_KINDS


def test_scale_halves_on_overflow_down_to_the_floor_and_doubles_after_the_interval():
  s = loss_scale.DynamicLossScale.create(8.0)
  s = s.update(jnp.asarray(True))
  assert float(s.scale) == 8.0 and int(s.good_steps) == 1
  s = s.update(jnp.asarray(False))
  assert float(s.scale) == 4.0 and int(s.good_steps) == 0
  for _ in range(4):
    s = s.update(jnp.asarray(False))
  assert float(s.scale) == loss_scale.MIN_SCALE == 1.0
  s = loss_scale.DynamicLossScale(scale=jnp.float32(1024.0),
                                  good_steps=jnp.int32(loss_scale.GROWTH_INTERVAL - 2))
  s = s.update(jnp.asarray(True))
  assert float(s.scale) == 1024.0 and int(s.good_steps) == loss_scale.GROWTH_INTERVAL - 1
  s = s.update(jnp.asarray(True))
  assert float(s.scale) == 2048.0 and int(s.good_steps) == 0


class _Conv(nn.Module):
  dtype: jnp.dtype = jnp.float16

  @nn.compact
  def __call__(self, x):
    return nn.Conv(8, (3, 3), dtype=self.dtype)(x)


def test_scaling_recovers_filter_gradients_that_underflow_in_float16():
  """A loss of ~1e-5 (cotangents ~1e-8 per output): they flush to zero in float16, so the unscaled filter
  gradient is exactly zero; scaled by 2**16 it matches the float32 gradient."""
  model = _Conv()
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 12, 12, 4))
  params = model.init(jax.random.PRNGKey(1), x)['params']

  def loss_fn(p, module=model):
    out = module.apply({'params': p}, x).astype(jnp.float32)
    return 1e-5 * jnp.mean(out ** 2), ()

  exact = jax.grad(lambda p: loss_fn(p, _Conv(jnp.float32))[0])(params)['Conv_0']['kernel']
  (_, _), plain = loss_scale.value_and_grad(loss_fn, params, None)
  (loss, _), scaled = loss_scale.value_and_grad(loss_fn, params,
                                                loss_scale.DynamicLossScale.create())
  assert float(jnp.abs(plain['Conv_0']['kernel']).max()) == 0.0
  assert scaled['Conv_0']['kernel'].dtype == jnp.float32
  np.testing.assert_allclose(scaled['Conv_0']['kernel'], exact,
                             rtol=0.02, atol=0.02 * float(jnp.abs(exact).max()))
  # The returned loss is the unscaled one.
  np.testing.assert_allclose(loss, loss_fn(params, _Conv(jnp.float32))[0], rtol=1e-2)


def _tiny_config(**overrides):
  config = base_config.fcn_config('fcn8s', 'digit_scenes')
  config.dataset.crop_size = (32, 32)
  config.model.width_multiplier = 1 / 8
  config.model.dtype = 'float16'
  config.eval.tta.scales = (1.0,)
  config.optimizer.warmup_steps = 0
  config.update_from_flattened_dict(overrides)
  return config


def _batch(config):
  images = jax.random.normal(jax.random.PRNGKey(2), (4, 32, 32, 3))
  labels = jax.random.randint(jax.random.PRNGKey(3), (4, 32, 32), 0,
                              config.dataset.num_classes)
  return {'image': images, 'label': labels}


@pytest.mark.slow
def test_float16_step_matches_float32_and_an_overflow_only_lowers_the_scale():
  config = _tiny_config()
  state = trainer.create_state(config)
  assert float(state.loss_scale.scale) == loss_scale.INITIAL_SCALE
  step = jax.jit(steps.bind_train_step(config, axis_name=None))
  batch = _batch(config)
  new_state, metrics = step(state, batch)
  assert float(metrics['overflow']) == 0.0 and float(metrics['nonfinite']) == 0.0
  assert float(metrics['loss_scale']) == loss_scale.INITIAL_SCALE
  assert int(new_state.loss_scale.good_steps) == 1

  reference = trainer.create_state(_tiny_config(**{'model.dtype': 'float32'}))
  assert reference.loss_scale is None
  _, reference_metrics = jax.jit(steps.bind_train_step(config, axis_name=None))(
      reference, batch)
  np.testing.assert_allclose(metrics['loss'], reference_metrics['loss'], rtol=2e-3)
  np.testing.assert_allclose(metrics['grad_norm'], reference_metrics['grad_norm'], rtol=0.05)

  # A scale of 2**100 overflows float16 cotangents: no update, half the scale, no fault.
  huge = state.replace(loss_scale=loss_scale.DynamicLossScale.create(2.0 ** 100))
  skipped, metrics = step(huge, batch)
  assert float(metrics['overflow']) == 1.0 and float(metrics['nonfinite']) == 0.0
  assert float(skipped.loss_scale.scale) == 2.0 ** 99 and int(skipped.step) == 1
  for a, b in zip(jax.tree_util.tree_leaves(skipped.params),
                  jax.tree_util.tree_leaves(state.params), strict=True):
    np.testing.assert_array_equal(a, b)
  # At the floor an overflow is a fault (config.nonfinite applies).
  floor = state.replace(loss_scale=loss_scale.DynamicLossScale(
      scale=jnp.float32(loss_scale.MIN_SCALE), good_steps=jnp.int32(0)))
  _, metrics = step(floor, {**batch, 'image': batch['image'].at[0, 0, 0, 0].set(jnp.inf)})
  assert float(metrics['nonfinite']) == 1.0


@pytest.mark.slow
def test_float16_run_logs_and_checkpoints_its_scale(tmp_path, data_dir):
  config = _tiny_config(**{'dataset.name': 'digit_scenes/tiny', 'dataset.data_dir': data_dir,
                           'batch_size': 4, 'eval_batch_size': 10, 'num_train_steps': 3,
                           'eval_every_steps': 3, 'checkpoint_every_steps': 3,
                           'log_every_steps': 3})
  trainer.train_and_evaluate(config, str(tmp_path))
  [record] = metric_writer.read_metrics(str(tmp_path), 'train')
  assert record['loss_scale'] == loss_scale.INITIAL_SCALE and record['overflow'] == 0.0
  assert np.isfinite(record['loss'])
  ckpt = checkpoints.Checkpointer(os.path.join(str(tmp_path), 'checkpoints'))
  state, _ = ckpt.restore(trainer.create_state(config))
  assert int(state.step) == 3 and int(state.loss_scale.good_steps) == 3
  assert float(state.loss_scale.scale) == loss_scale.INITIAL_SCALE
  with pytest.raises(checkpoints.CheckpointMismatch, match='has a float16 loss scale'):
    ckpt.check_compatible(trainer.create_state(_tiny_config(**{'model.dtype': 'float32'})), 3)
  ckpt.close()


@pytest.mark.parametrize('make, validate', CONFIG_KINDS)
def test_unknown_loss_scaling_is_rejected_naming_the_choices(make, validate):
  config = make()
  config.loss_scaling = 'static'
  with pytest.raises(ValueError,
                     match=r"config.loss_scaling='static' is not one of \('auto', 'dynamic'"):
    validate(config)


def test_auto_scales_float16_only():
  config = base_config.get_base_config()
  assert not loss_scale.enabled(config)
  config.model.dtype = 'bfloat16'
  assert not loss_scale.enabled(config)
  config.model.dtype = 'float16'
  assert loss_scale.enabled(config)
  config.loss_scaling = 'none'
  assert not loss_scale.enabled(config)
