"""In-process A/B of a train step with and without the session-21 memory changes
(README.md, "The train step's temporaries halved"): segjax's BatchNorm (gradient keeping
x only; old: flax's `nn.BatchNorm`), the conv backward tied to dy (`layers.after`; old:
untied) and the skipped-step conditional (`TrainState.apply_gradients_if_finite`; old: a
select between the updated and the old state).

  python experiments/benchmarks/ab_train_step_memory.py --pairs=7 [--undo=bn,after,cond]
  python experiments/benchmarks/ab_train_step_memory.py --config=configs/mask_rcnn_r50_fpn.py:coco \
      --config.model.freeze_bn=False --batch_size=1 --image_size=512,512

Prints each pair's step times (new, old) and the median of old / new (> 1: new faster),
and (semantic configs) both steps' XLA temporaries. Instance configs start every step
from the initial state (the harness's --same_state).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
from absl import app, flags
from ml_collections import config_flags

from segjax.benchmarks import measure, segjax_workloads
from segjax.models import layers
from segjax.train import host_memory
from segjax.train.state import TrainState, all_finite

_CONFIG = config_flags.DEFINE_config_file('config', 'configs/fcn_resnet50.py:voc')
_PAIRS = flags.DEFINE_integer('pairs', 5, 'timed pairs')
_UNDO = flags.DEFINE_multi_enum('undo', ['bn', 'after', 'cond'], ['bn', 'after', 'cond'],
                                'the changes the old side undoes')
_BATCH = flags.DEFINE_integer('batch_size', 2, 'images per step')
_SIZE = flags.DEFINE_list('image_size', ['320', '320'], 'H,W')


def flax_batch_norm(train, *, axis_name=None, dtype=None, scale_init=nn.initializers.ones,
                    name=None):
  return nn.BatchNorm(use_running_average=not train, momentum=layers.BN_MOMENTUM,
                      epsilon=layers.BN_EPSILON, axis_name=axis_name, dtype=dtype,
                      scale_init=scale_init, name=name)


def select_update(self, grads, loss, **changes):
  """`apply_gradients_if_finite` before session 21: a select of both states."""
  finite = all_finite(loss, grads)
  updated = self.apply_gradients(grads, **changes)
  kept = self.replace(step=self.step + 1, **{name: getattr(self, name) for name in changes})
  return jax.tree_util.tree_map(lambda new, old: jnp.where(finite, new, old),
                                updated, kept), finite


def main(_):
  host_memory.configure('auto')
  size = tuple(int(v) for v in _SIZE.value)
  config = segjax_workloads.prepare_config(_CONFIG.value, _BATCH.value, size)
  batch = segjax_workloads.make_batch(config, _BATCH.value, size)
  instance = segjax_workloads.is_instance(config)
  if not instance:
    print(f'new: temporaries {segjax_workloads.temporaries_mb(config, "train", batch):.1f} MB', flush=True)
  new = segjax_workloads.workload(config, 'train', batch, name='new', same_state=instance)
  print('new warm-up', measure.warm_up(new), flush=True)
  saved = layers.batch_norm, layers.after, TrainState.apply_gradients_if_finite
  if 'bn' in _UNDO.value:
    layers.batch_norm = flax_batch_norm
  if 'after' in _UNDO.value:
    layers.after = lambda dy, *arrays: list(arrays)
  if 'cond' in _UNDO.value:
    TrainState.apply_gradients_if_finite = select_update
  try:  # traced and compiled with the old code
    if not instance:
      print(f'old: temporaries {segjax_workloads.temporaries_mb(config, "train", batch):.1f} MB', flush=True)
    old = segjax_workloads.workload(config, 'train', batch, name='old', same_state=instance)
    print('old warm-up', measure.warm_up(old), flush=True)
  finally:
    layers.batch_norm, layers.after, TrainState.apply_gradients_if_finite = saved
  result = measure.alternate(new, old, _PAIRS.value, on_pair=lambda i, a, b: print(
      f'pair {i}: new {a:.3f} s, old {b:.3f} s, old/new {b / a:.3f}', flush=True))
  print(f"old/new median {result['ratio_median']:.3f} (min {result['ratio_min']:.3f}, "
        f"max {result['ratio_max']:.3f}); compiles during timing "
        f"{result['compiles_during_timing']}")


if __name__ == '__main__':
  app.run(main)
