"""Checkpoint retention: the latest `keep` plus the `keep_best` best by the named metric."""

import glob
import os
import shutil

import jax.numpy as jnp
import optax
import pytest

from segjax.train import checkpoints
from segjax.train.state import TrainState


def _state(step):
  tx = optax.sgd(0.1)
  params = {'w': jnp.full((2,), float(step))}
  return TrainState(step=jnp.asarray(step, jnp.int32), params=params, batch_stats={},
                    opt_state=tx.init(params), rng=jnp.zeros((2,), jnp.uint32),
                    apply_fn=None, tx=tx)


@pytest.mark.parametrize('best_metric', ['miou', 'bbox_AP'])
def test_keeps_latest_and_best_by_the_named_metric(tmp_path, best_metric):
  ckpt = checkpoints.Checkpointer(str(tmp_path), keep=1, keep_best=1, best_metric=best_metric,
                                  async_save=False)
  scores = {1: 0.2, 2: 0.7, 3: 0.4, 4: 0.1}
  for step, score in scores.items():
    # The other metric is there too, ranking the other way: it must not be used.
    other = 'bbox_AP' if best_metric == 'miou' else 'miou'
    ckpt.save(_state(step), {'position': step},
              metrics={best_metric: score, other: 1.0 - score})
  ckpt.wait()
  kept = sorted(int(d) for d in os.listdir(tmp_path) if d.isdigit())
  assert kept == [2, 4]            # the best (0.7) and the latest
  state, data = ckpt.restore(_state(0), step=2)
  assert float(state.params['w'][0]) == 2.0 and data == {'position': 2}
  ckpt.close()


# Faults injected into the latest checkpoint (step 3) of three; each must be detected.
def _truncate(path):
  with open(path, 'r+b') as f:
    f.truncate(os.path.getsize(path) // 2)


def _scribble(path):
  with open(path, 'r+b') as f:
    f.seek(8)
    f.write(b'\x00not an array\xff' * 2)


_FAULTS = {
    'truncated array file': ('state/d/*', _truncate),
    'corrupted array file': ('state/d/*', _scribble),
    'array file deleted': ('state/d/*', os.remove),
    'state metadata deleted': ('state/_METADATA', os.remove),
    'state item deleted': ('state', shutil.rmtree),
    'data-iterator state truncated': ('data/metadata', _truncate),
}


def _three_checkpoints(directory):
  ckpt = checkpoints.Checkpointer(directory, keep=3, async_save=False)
  for step in (1, 2, 3):
    ckpt.save(_state(step), {'position': step})
  ckpt.close()


@pytest.mark.parametrize('fault', sorted(_FAULTS))
def test_unreadable_latest_checkpoint_is_moved_aside_and_the_previous_one_used(
    tmp_path, fault):
  directory = str(tmp_path / 'checkpoints')
  _three_checkpoints(directory)
  pattern, damage = _FAULTS[fault]
  paths = glob.glob(os.path.join(directory, '3', pattern))
  assert paths, pattern
  for path in paths:
    damage(path)
  ckpt = checkpoints.Checkpointer(directory, keep=3)
  state, data = ckpt.restore_latest(_state(0))
  assert int(state.step) == 2 and float(state.params['w'][0]) == 2.0
  assert data == {'position': 2}
  assert os.path.isdir(tmp_path / 'checkpoints_corrupt' / '3')
  assert ckpt.latest_step() == 2
  ckpt.save(_state(3), {'position': 3})  # the step can be written again
  ckpt.wait()
  assert ckpt.restore_latest(_state(0))[1] == {'position': 3}
  ckpt.close()


def test_no_readable_checkpoint_is_an_error_and_no_checkpoint_is_none(tmp_path):
  directory = str(tmp_path / 'checkpoints')
  assert checkpoints.Checkpointer(directory).restore_latest(_state(0)) is None
  _three_checkpoints(directory)
  for step in (1, 2, 3):
    shutil.rmtree(os.path.join(directory, str(step), 'state'))
  with pytest.raises(checkpoints.NoReadableCheckpoint, match=r'\[1, 2, 3\]'):
    checkpoints.Checkpointer(directory).restore_latest(_state(0))


def test_checkpoint_of_a_different_model_is_a_clear_mismatch(tmp_path):
  directory = str(tmp_path / 'checkpoints')
  _three_checkpoints(directory)
  other = _state(0)
  tx = other.tx
  params = {'w': jnp.zeros((3,)), 'head': {'kernel': jnp.zeros((2, 2))}}
  other = other.replace(params=params, opt_state=tx.init(params))
  with pytest.raises(checkpoints.CheckpointMismatch) as raised:
    checkpoints.Checkpointer(directory).restore_latest(other)
  message = str(raised.value)
  assert 'step 3' in message
  assert 'the checkpoint lacks: head/kernel' in message
  assert 'w (2,) in the checkpoint vs (3,) in the model' in message
  assert sorted(os.listdir(directory)) == ['1', '2', '3']  # nothing moved or deleted
