"""python -m segjax.convert --from=torchvision --arch=ARCH --input=weights.pth --output=DIR

Converts a torchvision state_dict into a segjax checkpoint (Orbax) of params and
batch_stats; `config.init_from.path=DIR` then initialises a run from it. ARCH is one
of `segjax.convert.from_torchvision.ARCHS`.
"""

from __future__ import annotations

import os
import sys

from absl import app, flags, logging

SOURCES = ('torchvision',)

flags.DEFINE_string('from', 'torchvision', f'where the weights come from; one of {SOURCES}')
flags.DEFINE_string('arch', None, 'torchvision architecture name, e.g. resnet50, fcn_resnet50')
flags.DEFINE_string('input', None, 'the .pth file (a state_dict)')
flags.DEFINE_string('output', None, 'directory to write the segjax checkpoint to (must not exist)')
FLAGS = flags.FLAGS


def main(argv) -> None:
  del argv
  from segjax.convert import from_torchvision  # pylint: disable=g-import-not-at-top
  source = FLAGS['from'].value
  if source not in SOURCES:
    raise app.UsageError(f'--from={source!r} is not supported; choose one of {SOURCES}')
  for name in ('arch', 'input', 'output'):
    if not FLAGS[name].value:
      raise app.UsageError(f'--{name} is required')
  try:
    from_torchvision.check_arch(FLAGS.arch)
  except ValueError as e:
    raise app.UsageError(str(e)) from e
  if not os.path.isfile(FLAGS.input):
    raise app.UsageError(f'--input={FLAGS.input!r} is not a file')
  if os.path.exists(FLAGS.output):
    raise app.UsageError(f'--output={FLAGS.output!r} already exists; choose a new directory')
  path, report = from_torchvision.convert_file(FLAGS.arch, FLAGS.input, FLAGS.output)
  logging.info('Converted %d tensors of %s (%s) to %s.', len(report.used), FLAGS.arch,
               FLAGS.input, path)
  if report.unused:
    logging.info('Not converted (no segjax counterpart): %s', ', '.join(report.unused))
  print(f'wrote {path}: {len(report.used)} tensors of {FLAGS.arch}'
        + (f'; not converted: {", ".join(report.unused)}' if report.unused else ''))


if __name__ == '__main__':
  sys.exit(app.run(main))
