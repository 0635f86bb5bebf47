"""Dataset registry and random-access sources (`tfds.data_source`, array_record).

`load_data_source(name, split, data_dir)` is the one way the pipeline opens data.
Names in `DATASETS` are segjax's own builders: they are built into `data_dir` on first
use (array_record, no TensorFlow) and reused afterwards. Any other name is handed to
`tfds.data_source(..., download=False)`, so a TFDS dataset already prepared in
array_record format plugs in without code changes.

A name may carry a builder config, `'digit_scenes/tiny'`, as in `tfds.builder`.

Several JAX processes building into one shared `data_dir` at once race (untested):
TFDS writes into a temporary directory and renames it at the end, and a second rename
may fail. On a multi-host run with a shared disk, build on process 0 first (call
`get_builder`, then a barrier), then let every process open the data.
"""

from __future__ import annotations

import dataclasses
import re

import tensorflow_datasets as tfds

from segjax.data import cityscapes, coco, digit_scenes, voc

# Builders that segjax ships. digit_scenes is built automatically on first use; the
# others read the user's downloaded files and are built once with
# `python -m segjax.data.build --dataset=NAME --manual_dir=... --data_dir=...`.
DATASETS = {
    'digit_scenes': digit_scenes.DigitScenes,
    'voc_segmentation': voc.VocSegmentation,
    'coco_instances': coco.CocoInstances,
    'cityscapes_semantic': cityscapes.CityscapesSemantic,
}
# Builders that need --manual_dir (MANUAL_DOWNLOAD_INSTRUCTIONS), never built on first use.
MANUAL_DATASETS = tuple(name for name, cls in DATASETS.items()
                        if getattr(cls, 'MANUAL_DOWNLOAD_INSTRUCTIONS', None))


@dataclasses.dataclass(frozen=True)
class DatasetMetadata:
  """What a model and a metric need to know about a semantic segmentation dataset."""

  num_classes: int  # Semantic classes, background included.
  class_names: tuple[str, ...]
  ignore_label: int


DATASET_METADATA = {
    'digit_scenes': DatasetMetadata(
        num_classes=digit_scenes.NUM_CLASSES,
        class_names=digit_scenes.CLASS_NAMES,
        ignore_label=digit_scenes.IGNORE_LABEL,
    ),
    'voc_segmentation': DatasetMetadata(
        num_classes=voc.NUM_CLASSES,
        class_names=voc.CLASS_NAMES,
        ignore_label=voc.IGNORE_LABEL,
    ),
    'cityscapes_semantic': DatasetMetadata(
        num_classes=cityscapes.NUM_CLASSES,
        class_names=cityscapes.CLASS_NAMES,
        ignore_label=cityscapes.IGNORE_LABEL,
    ),
}


def get_metadata(name: str) -> DatasetMetadata:
  """Metadata of a registered dataset; `name` may carry a config ('x/tiny')."""
  base = name.split('/')[0]
  if base not in DATASET_METADATA:
    raise ValueError(
        f'No metadata for dataset {name!r}; known: {sorted(DATASET_METADATA)}.'
    )
  return DATASET_METADATA[base]


def _split_base_names(split: str) -> list[str]:
  """'train[:10%]+validation' -> ['train', 'validation']."""
  return [re.sub(r'\[.*\]$', '', part.strip()) for part in split.split('+')]


def _check_split(name: str, split: str, builder: tfds.core.DatasetBuilder) -> None:
  valid = sorted(builder.info.splits.keys())
  for base in _split_base_names(split):
    if base not in valid:
      raise ValueError(
          f'Unknown split {split!r} for dataset {name!r}; valid splits: {valid}.'
      )


def validate_dataset_name(name: str) -> None:
  """Raises ValueError unless `name` is a segjax dataset (config) or a TFDS builder.

  Cheap: reads no data and builds nothing, so config validation can call it.
  """
  if not isinstance(name, str) or not name:
    raise ValueError(f'Dataset name must be a non-empty string, got {name!r}.')
  base, _, config = name.partition('/')
  if base in DATASETS:
    valid_configs = [c.name for c in DATASETS[base].BUILDER_CONFIGS]
    if config and config not in valid_configs:
      raise ValueError(
          f'Unknown config {config!r} for dataset {base!r} (in {name!r}); '
          f'valid: {valid_configs}.'
      )
    return
  try:
    tfds.builder_cls(base)
  except tfds.core.registered.DatasetNotFoundError:
    raise ValueError(
        f'Unknown dataset {name!r}; valid: {sorted(DATASETS)} (built by segjax) or '
        'the name of a TFDS builder already prepared in array_record format.'
    ) from None


def class_names(name: str) -> list[str] | None:
  """Class names of `name` (index = semantic label), or None if segjax has none."""
  base = name.split('/')[0]
  if base not in DATASET_METADATA:
    return None
  return list(DATASET_METADATA[base].class_names)


def get_builder(name: str, data_dir: str | None) -> tfds.core.DatasetBuilder:
  """The TFDS builder for `name`, built into `data_dir` if it is a segjax builder.

  Raises ValueError for a name that is neither in `DATASETS` nor a TFDS builder, and
  FileNotFoundError (with the build command) for a dataset of `MANUAL_DATASETS` not
  yet built in `data_dir`.
  """
  validate_dataset_name(name)
  base, _, config = name.partition('/')
  if base in DATASETS:
    builder = DATASETS[base](
        config=config or None, data_dir=data_dir, file_format='array_record'
    )
    if not builder.is_prepared():
      if base in MANUAL_DATASETS:
        raise FileNotFoundError(
            f'Dataset {name!r} is not built in data_dir={data_dir!r} (looked for '
            f'{builder.data_path}). Build it once from your downloaded files: python -m '
            f'segjax.data.build --dataset={name} --manual_dir=/path/to/download '
            f'--data_dir={data_dir or "~/tensorflow_datasets"}')
      builder.download_and_prepare(file_format='array_record')
    return builder
  return tfds.builder(name, data_dir=data_dir)


class _Undecoded(tfds.decode.Decoder):
  """Leaves a feature as stored (e.g. a PNG's bytes): for features a pipeline never reads."""

  def decode_example(self, serialized):
    return serialized

  def decode_example_np(self, serialized):
    return serialized

  def decode_batch_example_np(self, serialized):
    return serialized


def _skip_decoding(feature):
  """The decoder tree that leaves `feature` (and all it nests) undecoded."""
  if isinstance(feature, tfds.features.Sequence):
    feature = feature.feature
  if isinstance(feature, tfds.features.FeaturesDict):
    return {key: _skip_decoding(sub) for key, sub in feature.items()}
  return _Undecoded()


def load_data_source(name: str, split: str, data_dir: str | None,
                     features: tuple[str, ...] | None = None):
  """A random-access source of `split` of dataset `name` (a `tfds.data_source`).

  Builds segjax's own datasets (`DATASETS`) on first use; never rebuilds them.
  `data_dir` None means the TFDS default (`~/tensorflow_datasets` or $TFDS_DATA_DIR).
  Records are dicts of numpy arrays, decoded without TensorFlow. With `features`
  (top-level names), only those are decoded; the others stay as stored (digit_scenes'
  per-object PNG masks took a third of a semantic pipeline's record time).
  """
  builder = get_builder(name, data_dir)
  _check_split(name, split, builder)
  decoders = None
  if features is not None:
    decoders = {key: _skip_decoding(feature) for key, feature in builder.info.features.items()
                if key not in features}
  if name.split('/')[0] in DATASETS:
    return builder.as_data_source(split=split, decoders=decoders)
  return tfds.data_source(name, split=split, data_dir=data_dir, download=False,
                          decoders=decoders)
