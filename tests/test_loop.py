"""The shared step loop's fault handling: non-finite steps ('stop' / 'skip'), never a NaN
parameter on disk, and resuming past a corrupted latest checkpoint."""

import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from segjax import base_config, config_validation, detection_config
from segjax.train import checkpoints, loop, metric_writer, trainer
from segjax.train.state import TrainState

pytestmark = pytest.mark.slow


def _tiny_config(data_dir, *, steps, checkpoint_every, **overrides):
  config = base_config.fcn_config('fcn8s', 'digit_scenes')
  config.dataset.name = 'digit_scenes/tiny'
  config.dataset.data_dir = data_dir
  config.dataset.crop_size = (32, 32)
  config.model.width_multiplier = 1 / 8
  config.eval.tta.scales = (1.0,)  # one test scale: these runs test the loop
  config.batch_size = 4
  config.eval_batch_size = 10
  config.num_train_steps = steps
  config.eval_every_steps = steps
  config.checkpoint_every_steps = checkpoint_every
  config.log_every_steps = steps
  config.optimizer.warmup_steps = 0
  config.update(overrides)
  return config


def _params(workdir, config, step=None):
  state, _ = checkpoints.Checkpointer(os.path.join(workdir, 'checkpoints')).restore(
      trainer.create_state(config), step=step)
  return state


def _all_finite(tree):
  return all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree_util.tree_leaves(tree))


# AdamW moves every parameter by about the learning rate: after step 1 the weights are
# ~1e30, and step 2's activations overflow to inf and NaN (BatchNorm: inf - inf).
_EXPLODING_LR = 1e30


def test_stop_policy_names_the_step_and_keeps_the_last_good_checkpoint(tmp_path, data_dir):
  config = _tiny_config(data_dir, steps=4, checkpoint_every=1)
  config.optimizer.learning_rate = _EXPLODING_LR
  with pytest.raises(loop.NonFiniteLoss) as raised:
    trainer.train_and_evaluate(config, str(tmp_path))
  assert raised.value.step == 2
  message = str(raised.value)
  assert 'step 2' in message and 'latest checkpoint (step 1' in message
  assert '--config.nonfinite=skip' in message
  ckpt = checkpoints.Checkpointer(str(tmp_path / 'checkpoints'))
  assert ckpt.manager.all_steps() == [1]  # nothing of step 2 was written
  assert _all_finite(_params(str(tmp_path), config).params)


def test_skip_policy_counts_skipped_steps_and_keeps_parameters_finite(tmp_path, data_dir):
  config = _tiny_config(data_dir, steps=5, checkpoint_every=1, nonfinite='skip',
                        keep_checkpoints=5)
  config.optimizer.learning_rate = _EXPLODING_LR
  trainer.train_and_evaluate(config, str(tmp_path))
  [record] = metric_writer.read_metrics(str(tmp_path), 'train')
  assert record['step'] == 5 and record['skipped_steps'] == 4.0  # steps 2-5
  first = _params(str(tmp_path), config, step=1)
  last = _params(str(tmp_path), config, step=5)
  assert int(last.step) == 5
  assert _all_finite(last.params) and _all_finite(last.batch_stats)
  for a, b in zip(jax.tree_util.tree_leaves(first.params), jax.tree_util.tree_leaves(last.params),
                  strict=True):
    np.testing.assert_array_equal(a, b)  # every later update was skipped


def test_finite_runs_log_zero_skipped_steps(tmp_path, data_dir):
  config = _tiny_config(data_dir, steps=3, checkpoint_every=3)
  trainer.train_and_evaluate(config, str(tmp_path))
  [record] = metric_writer.read_metrics(str(tmp_path), 'train')
  assert record['skipped_steps'] == 0.0 and np.isfinite(record['loss'])


# (default config, its validator) of the semantic and the instance task: the loop's
# fields are validated by both.
CONFIG_KINDS = [(base_config.get_base_config, config_validation.validate_config),
                (detection_config.get_detection_base_config,
                 detection_config.validate_detection_config)]


@pytest.mark.parametrize('make, validate', CONFIG_KINDS)
def test_unknown_nonfinite_policy_is_rejected_naming_the_choices(make, validate):
  config = make()
  config.nonfinite = 'ignore'
  with pytest.raises(ValueError, match=r"config.nonfinite='ignore'.*\('stop', 'skip'\)"):
    validate(config)


def test_checkpointer_refuses_to_write_nan_parameters(tmp_path):
  tx = optax.sgd(0.1)
  params = {'head': {'kernel': jnp.array([1.0, jnp.nan])}}
  state = TrainState(step=jnp.asarray(7, jnp.int32), params=params, batch_stats={},
                     opt_state=tx.init(params), rng=jnp.zeros((2,), jnp.uint32),
                     apply_fn=None, tx=tx)
  ckpt = checkpoints.Checkpointer(str(tmp_path), async_save=False)
  with pytest.raises(ValueError, match='step 7: parameter head/kernel is not finite'):
    ckpt.save(state, {'position': 0})
  ckpt.close()
  assert not [d for d in os.listdir(tmp_path) if d.isdigit()]


def test_conv_weight_grad_option_reaches_the_train_step(tmp_path, data_dir):
  """One SGD step with 'taps' (every filter gradient as per-tap matmuls) and with
  'tap_matmuls' (both gradients, and 1x1 forwards, as per-tap matmuls) against XLA's:
  equal to float rounding, and not bit-identical, so the option reached the traced step.
  (Over several steps of this tiny-batch net, BatchNorm amplifies rounding to percents.)"""
  finals = {}
  for impl in ('xla', 'taps', 'tap_matmuls'):
    config = _tiny_config(data_dir, steps=1, checkpoint_every=1, conv_weight_grad=impl)
    config.optimizer.name, config.optimizer.momentum = 'sgd', 0.0
    trainer.train_and_evaluate(config, str(tmp_path / impl))
    finals[impl] = jax.tree_util.tree_leaves(_params(str(tmp_path / impl), config).params)
  for impl in ('taps', 'tap_matmuls'):
    for a, b in zip(finals['xla'], finals[impl], strict=True):
      np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-7)
    assert any(not np.array_equal(a, b) for a, b in zip(finals['xla'], finals[impl]))


def test_unknown_conv_weight_grad_is_rejected_naming_the_choices():
  config = base_config.get_base_config()
  config.conv_weight_grad = 'im2col'
  with pytest.raises(ValueError, match=r"conv_weight_grad='im2col'.*'taps_1x1'"):
    config_validation.validate_config(config)


class _CountingIterator:
  """Yields 0, 1, 2, ...; its state is the next value; records what was read."""

  def __init__(self, stop=None):
    self.next_value, self.stop = 0, stop

  def __next__(self):
    if self.next_value == self.stop:
      raise StopIteration
    self.next_value += 1
    return self.next_value - 1

  def get_state(self):
    return {'next': self.next_value}


def test_device_prefetch_runs_ahead_and_reports_the_position_of_the_last_batch_used():
  source, put = _CountingIterator(stop=6), []
  feed = loop.DevicePrefetch(source, lambda b: put.append(b) or ('on device', b), depth=2)
  assert feed.get_state() == {'next': 0} and put == []
  assert next(feed) == ('on device', 0)
  assert put == [0, 1, 2]  # the batch used and two ahead
  assert feed.get_state() == {'next': 1}  # resume at batch 1, not 3
  assert [next(feed)[1] for _ in range(2)] == [1, 2]
  assert put == [0, 1, 2, 3, 4] and feed.get_state() == {'next': 3}
  assert [b for _, b in feed] == [3, 4, 5]  # the queued ones outlive the source
  assert feed.get_state() == {'next': 6}
  put = []
  no_ahead = loop.DevicePrefetch(_CountingIterator(), put.append, depth=0)
  next(no_ahead)
  assert put == [0] and no_ahead.get_state() == {'next': 1}


def test_prefetch_depth_changes_neither_the_parameters_nor_the_saved_positions(tmp_path,
                                                                              data_dir):
  runs = {}
  for depth in (0, 3):
    config = _tiny_config(data_dir, steps=3, checkpoint_every=2, prefetch_to_device=depth)
    workdir = str(tmp_path / str(depth))
    trainer.train_and_evaluate(config, workdir)
    ckpt = checkpoints.Checkpointer(os.path.join(workdir, 'checkpoints'))
    runs[depth] = [ckpt.restore(trainer.create_state(config), step=step) for step in (2, 3)]
    ckpt.close()
  for (state_a, data_a), (state_b, data_b) in zip(runs[0], runs[3], strict=True):
    assert data_a == data_b
    for a, b in zip(jax.tree_util.tree_leaves(state_a.params),
                    jax.tree_util.tree_leaves(state_b.params), strict=True):
      np.testing.assert_array_equal(a, b)
  assert runs[0][0][1] != runs[0][1][1]  # the positions moved between the checkpoints


@pytest.mark.parametrize('make, validate', CONFIG_KINDS)
@pytest.mark.parametrize('depth', [-1, True])
def test_bad_prefetch_depth_is_rejected_naming_the_value(make, validate, depth):
  config = make()
  config.prefetch_to_device = depth
  with pytest.raises(ValueError, match=rf'config.prefetch_to_device={depth!r} must be an '
                                       r'integer >= 0'):
    validate(config)


def test_resume_with_another_worker_count_names_both_counts(data_dir):
  from segjax.data import pipeline
  c = pipeline.default_dataset_config()
  c.name, c.data_dir, c.prefetch = 'digit_scenes/tiny', data_dir, 0
  it = iter(pipeline.create_train_loader(c, global_batch_size=4, seed=0, process_index=0,
                                         process_count=1))
  next(it)
  state = it.get_state()
  loop.check_input_workers(state, 0, '/w/checkpoints')  # the same count: fine
  loop.check_input_workers(state.decode(), 0, '/w/checkpoints')  # as stored: a string
  with pytest.raises(ValueError, match=r'config.dataset.num_workers=2, but the checkpoint '
                     r'in /w/checkpoints saved its input position with num_workers=0'):
    loop.check_input_workers(state, 2, '/w/checkpoints')
