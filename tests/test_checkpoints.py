"""Checkpoint retention: the latest `keep` plus the `keep_best` best by the named metric."""

import os

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
