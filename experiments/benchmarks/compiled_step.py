"""XLA's figures for one compiled segjax step, without running it: temporaries
(`memory_analysis()`), GFLOP (`cost_analysis()`) and the optimized HLO's line count.

  python experiments/benchmarks/compiled_step.py --config=configs/fcn_resnet50.py:voc \
      --mode=train --batch_size=2 --image_size=320,320 [--config.model.remat=True]

Semantic configs only; the step is `segjax_workloads.compile_step`'s, jitted as the
benchmark harness jits it.
"""

from __future__ import annotations

import jax
from absl import app, flags
from ml_collections import config_flags

from segjax.benchmarks import measure, segjax_workloads

_CONFIG = config_flags.DEFINE_config_file('config', 'configs/fcn_resnet50.py:voc')
_MODE = flags.DEFINE_enum('mode', 'train', ['train', 'infer'], 'which step')
_BATCH = flags.DEFINE_integer('batch_size', 2, 'images per step')
_SIZE = flags.DEFINE_list('image_size', ['320', '320'], 'H,W')


def main(argv: list[str]) -> None:
  del argv
  size = tuple(int(v) for v in _SIZE.value)
  if len(size) != 2:
    raise app.UsageError(f'--image_size={",".join(_SIZE.value)} must be H,W')
  config = segjax_workloads.prepare_config(_CONFIG.value, _BATCH.value, size)
  if segjax_workloads.is_instance(config):
    raise app.UsageError(f'{config.model.name} is an instance model; this script takes '
                         'semantic configs')
  batch = segjax_workloads.make_batch(config, _BATCH.value, size)
  compiled = segjax_workloads.compile_step(config, _MODE.value, batch)
  print(f'{config.model.name} {_MODE.value} {_BATCH.value}x{size[0]}x{size[1]}: '
        f'temporaries {compiled.memory_analysis().temp_size_in_bytes / 2**20:.1f} MB, '
        f'{measure.analysed_flops(compiled) / 1e9:.1f} GFLOP, '
        f'{compiled.as_text().count(chr(10))} optimized HLO lines')


if __name__ == '__main__':
  app.run(main)
