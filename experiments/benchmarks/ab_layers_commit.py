"""In-process A/B of a step (train or inference) with segjax's conv layers as they are
and as they were at an earlier commit: `segjax/models/layers.py` of `--old_commit` is
loaded as a module of its own (`git show`) and its `--old_functions` replace the current
ones while the old step is traced (functions the old file lacks: `_ABSENT`'s stand-ins).
Both steps are the harness's workloads (`segjax.benchmarks.segjax_workloads`), timed in
alternating pairs.

  python experiments/benchmarks/ab_layers_commit.py --mode=infer --pairs=9
  python experiments/benchmarks/ab_layers_commit.py --mode=train --pairs=7

Prints both steps' XLA temporaries (`memory_analysis()`; semantic configs), each pair's
step times and the median of old / new (> 1: new faster). Instance configs' train steps
start every step from the initial state (the harness's --same_state). Needs a git
checkout (the old file comes from it).
"""

from __future__ import annotations

import importlib.util
import pathlib
import subprocess
import sys
import tempfile

from absl import app, flags
from ml_collections import config_flags

from segjax.benchmarks import measure, segjax_workloads
from segjax.models import layers
from segjax.train import host_memory

_CONFIG = config_flags.DEFINE_config_file('config', 'configs/fcn_resnet50.py:voc')
_MODE = flags.DEFINE_enum('mode', 'infer', ['infer', 'train'], 'the step compared')
_PAIRS = flags.DEFINE_integer('pairs', 5, 'timed pairs')
_BATCH = flags.DEFINE_integer('batch_size', 2, 'images per step')
_SIZE = flags.DEFINE_list('image_size', ['320', '320'], 'H,W')
_OLD_COMMIT = flags.DEFINE_string('old_commit', '7306d02', 'the commit of the old layers.py')
_OLD_FUNCTIONS = flags.DEFINE_list(
    'old_functions', ['conv3x3_winograd', 'conv3x3_winograd_filter_grad', 'after',
                      'computed_once', 'conv_as_tap_matmuls', '_conv_tap_matmuls_forward',
                      'tap_count'],
    'functions of segjax.models.layers the old side takes from the old file')


# Stand-ins for functions session 22 added, on an old side that lacks them: no stored
# outputs; no taps, so the conv backward takes autodiff's path (tap_matmul_grads unused).
_ABSENT = {'computed_once': lambda x: x, 'tap_count': lambda *args: 0}


def load_old_layers(commit: str):
  """`segjax/models/layers.py` at `commit`, imported as the module `old_layers`."""
  root = pathlib.Path(__file__).resolve().parents[2]
  source = subprocess.run(['git', 'show', f'{commit}:segjax/models/layers.py'], cwd=root,
                          capture_output=True, text=True, check=True).stdout
  path = pathlib.Path(tempfile.mkdtemp()) / 'old_layers.py'
  path.write_text(source)
  spec = importlib.util.spec_from_file_location('old_layers', path)
  module = importlib.util.module_from_spec(spec)
  sys.modules['old_layers'] = module
  spec.loader.exec_module(module)
  return module


def main(_):
  host_memory.configure('auto')
  size = tuple(int(v) for v in _SIZE.value)
  config = segjax_workloads.prepare_config(_CONFIG.value, _BATCH.value, size)
  batch = segjax_workloads.make_batch(config, _BATCH.value, size)
  mode = _MODE.value
  instance = segjax_workloads.is_instance(config)
  if not instance:
    print(f'new: temporaries {segjax_workloads.temporaries_mb(config, mode, batch):.1f} MB', flush=True)
  new = segjax_workloads.workload(config, mode, batch, name='new', same_state=instance)
  print('new warm-up', measure.warm_up(new), flush=True)
  old_layers = load_old_layers(_OLD_COMMIT.value)
  saved = {name: getattr(layers, name) for name in _OLD_FUNCTIONS.value}
  for name in saved:
    setattr(layers, name, getattr(old_layers, name, None) or _ABSENT[name])
  try:  # traced and compiled with the old functions
    if not instance:
      print(f'old: temporaries {segjax_workloads.temporaries_mb(config, mode, batch):.1f} MB', flush=True)
    old = segjax_workloads.workload(config, mode, batch, name='old', same_state=instance)
    print('old warm-up', measure.warm_up(old), flush=True)
  finally:
    for name, function in saved.items():
      setattr(layers, name, function)
  result = measure.alternate(new, old, _PAIRS.value, on_pair=lambda i, a, b: print(
      f'pair {i}: new {a:.3f} s, old {b:.3f} s, old/new {b / a:.3f}', flush=True))
  print(f"old/new median {result['ratio_median']:.3f} (min {result['ratio_min']:.3f}, "
        f"max {result['ratio_max']:.3f}); compiles during timing "
        f"{result['compiles_during_timing']}")


if __name__ == '__main__':
  app.run(main)
