import jax.numpy as jnp
import numpy as np
import pytest

from segjax import base_config
from segjax.train import optimizers


def _opt(**overrides):
  config = base_config.get_base_config().optimizer
  config.update(overrides)
  return config


def test_poly_schedule_with_warmup_matches_formula():
  config = _opt(learning_rate=0.1, warmup_steps=10, warmup_init_factor=0.0, power=0.9)
  schedule = optimizers.learning_rate_schedule(config, num_train_steps=110)
  assert float(schedule(0)) == pytest.approx(0.0)
  assert float(schedule(5)) == pytest.approx(0.05)
  for step in (10, 40, 100):
    expected = 0.1 * (1 - (step - 10) / 100) ** 0.9
    assert float(schedule(step)) == pytest.approx(expected, rel=1e-5)
  assert float(schedule(110)) == pytest.approx(0.0, abs=1e-8)


def test_sgd_weight_decay_skips_biases_and_scales():
  config = _opt(learning_rate=0.5, momentum=0.0, weight_decay=0.1, schedule='constant')
  tx = optimizers.build_optimizer(config, num_train_steps=10)
  params = {'conv': {'kernel': jnp.ones((1, 1, 2, 2)), 'bias': jnp.ones(2)},
            'bn': {'scale': jnp.ones(2)}}
  grads = {'conv': {'kernel': jnp.zeros((1, 1, 2, 2)), 'bias': jnp.zeros(2)},
           'bn': {'scale': jnp.zeros(2)}}
  updates, _ = tx.update(grads, tx.init(params), params)
  # Only the kernel decays: update = -lr * wd * w = -0.05.
  np.testing.assert_allclose(updates['conv']['kernel'], -0.05)
  np.testing.assert_allclose(updates['conv']['bias'], 0.0)
  np.testing.assert_allclose(updates['bn']['scale'], 0.0)


def test_adamw_builds_and_steps():
  config = _opt(name='adamw', learning_rate=1e-3, schedule='cosine')
  tx = optimizers.build_optimizer(config, num_train_steps=10)
  params = {'w': jnp.ones((2, 2))}
  updates, _ = tx.update({'w': jnp.ones((2, 2))}, tx.init(params), params)
  # First Adam step moves by lr * (1 + ~0) plus decoupled decay lr * wd * w.
  np.testing.assert_allclose(updates['w'], -1e-3 * (1 + 5e-4), rtol=1e-3)


@pytest.mark.parametrize('field,value,match', [
    ('name', 'adagrad', "'sgd', 'adamw'"),
    ('schedule', 'step', "'poly', 'cosine', 'constant'"),
    ('learning_rate', -1.0, 'learning_rate'),
])
def test_bad_optimizer_config_names_choices(field, value, match):
  config = _opt(**{field: value})
  with pytest.raises(ValueError, match=match):
    optimizers.validate_optimizer_config(config)
