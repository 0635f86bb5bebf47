"""Trains and evaluates a segjax model.

  python -m segjax.main --config=configs/fcn8s.py --workdir=/tmp/fcn8s
  python -m segjax.main --config=configs/fcn8s.py:voc --workdir=runs/fcn8s_voc \
      --config.batch_size=20

Rerun the same command in the same workdir to resume.
"""

from absl import app, flags, logging
from ml_collections import config_flags

from segjax.train import trainer

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Config file (path[:preset]).',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for checkpoints and metrics.')
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  logging.set_verbosity(logging.INFO)
  metrics = trainer.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  logging.info('final eval: miou=%.4f pixel_accuracy=%.4f', metrics['miou'],
               metrics['pixel_accuracy'])


if __name__ == '__main__':
  app.run(main)
