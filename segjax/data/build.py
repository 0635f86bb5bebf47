"""Builds a segjax dataset from the user's downloaded files into a TFDS data_dir (array_record).

  python -m segjax.data.build --dataset=voc_segmentation --manual_dir=/data/VOCdevkit \
      --data_dir=~/tensorflow_datasets
  python -m segjax.data.build --dataset=voc_segmentation/aug --manual_dir=/data/VOCdevkit ...
  python -m segjax.data.build --dataset=coco_instances --manual_dir=/data/coco ...
  python -m segjax.data.build --dataset=cityscapes_semantic --manual_dir=/data/cityscapes ...

Shows TFDS's per-split progress bar, then one line per split with its size. A layout
problem exits with status 1 and one line naming the missing file or folder; a bad
example stops the build naming its file unless --skip_bad_examples (logged, counted,
listed in the dataset info). An already built dataset is left as it is.
No TensorFlow is imported.
"""

from __future__ import annotations

import os
import sys

import tensorflow_datasets as tfds
from absl import app, flags, logging

from segjax.data import manual_files, sources




def build_dataset(name: str, manual_dir: str, data_dir: str | None, *,
                  skip_bad_examples: bool = False,
                  num_threads: int = 4) -> tfds.core.DatasetBuilder:
  """Builds `name` (a `sources.MANUAL_DATASETS` entry, '/config' allowed) from `manual_dir`.

  Returns the prepared builder. Raises ValueError for an unknown name,
  `manual_files.ManualFilesError` for a layout problem and
  `manual_files.BadExampleError` for a bad example (unless skipping).
  """
  base, _, config = name.partition('/')
  if base not in sources.MANUAL_DATASETS:
    raise ValueError(f'--dataset={name!r} is not built from downloaded files; valid: '
                     f'{list(sources.MANUAL_DATASETS)} (digit_scenes builds itself).')
  sources.validate_dataset_name(name)
  manual_dir = os.path.abspath(os.path.expanduser(manual_dir))
  manual_files.require_dir(manual_dir, f'the downloaded files of {base} (--manual_dir)')
  if data_dir is not None:
    data_dir = os.path.abspath(os.path.expanduser(data_dir))
  builder = sources.DATASETS[base](
      config=config or None, data_dir=data_dir, file_format='array_record',
      skip_bad_examples=skip_bad_examples, num_threads=num_threads)
  if builder.is_prepared():
    logging.info('%s is already built at %s; nothing to do.', name, builder.data_dir)
    return builder
  builder.download_and_prepare(
      file_format='array_record',
      download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
  return builder


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  if not _DATASET.value or not _MANUAL_DIR.value:
    raise app.UsageError('--dataset and --manual_dir are required.')
  logging.set_verbosity(logging.INFO)
  try:
    builder = build_dataset(_DATASET.value, _MANUAL_DIR.value, _DATA_DIR.value,
                            skip_bad_examples=_SKIP_BAD.value, num_threads=_NUM_THREADS.value)
  except (ValueError, manual_files.ManualFilesError) as error:
    print(f'error: {error}', file=sys.stderr)
    sys.exit(1)
  skipped = builder.info.metadata.get('skipped', {}) if builder.info.metadata else {}
  for split, info in sorted(builder.info.splits.items()):
    note = f', {len(skipped.get(split, []))} skipped' if skipped.get(split) else ''
    print(f'{_DATASET.value} {split}: {info.num_examples} examples{note}')
  print(f'written to {builder.data_dir}')


if __name__ == '__main__':
  # Flags exist only when this module is the program: importing it next to another
  # segjax command line (tests do) must not define the same absl flag twice.
  _DATASET = flags.DEFINE_string(
      'dataset', None, f'One of {list(sources.MANUAL_DATASETS)}, optionally with a config '
      "('voc_segmentation/aug').")
  _MANUAL_DIR = flags.DEFINE_string('manual_dir', None, 'Folder holding the downloaded files.')
  _DATA_DIR = flags.DEFINE_string('data_dir', None,
                                  'TFDS data_dir to write to (default ~/tensorflow_datasets).')
  _SKIP_BAD = flags.DEFINE_bool('skip_bad_examples', False,
                                'Log, count and skip unusable examples instead of stopping.')
  _NUM_THREADS = flags.DEFINE_integer('num_threads', 4, 'Threads decoding the files.')
  app.run(main)
