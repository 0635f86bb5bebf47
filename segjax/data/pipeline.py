"""grain input pipelines over `tfds.data_source` for semantic segmentation.

    train_loader = create_train_loader(config.dataset, global_batch_size=32, seed=0)
    for batch in train_loader:   # infinite
      batch['image']  # float32 [b, crop_h, crop_w, 3], normalised
      batch['label']  # int32 [b, crop_h, crop_w], ignore_label on padding

    for batch in create_eval_loader(config.dataset, global_batch_size=32):  # one epoch
      batch['image']  # float32 [b, pad_h, pad_w, 3]
      batch['label']  # int32 [b, pad_h, pad_w]
      batch['valid']  # bool [b, pad_h, pad_w], True on real pixels of real images

Here b = global_batch_size // process_count: each JAX process gets its own slice.

Static shapes. Train crops to `crop_size`; eval pads every image to `eval_pad_size`.
The eval split is padded in index space (`PaddedDataSource`) to a multiple of the
global batch size, so every process yields the same number of full batches; the extra
examples have `valid` all False and label `ignore_label`. Each real example appears
exactly once across all processes (contiguous blocks, one per process).

Determinism and resume. Train order comes from grain's `IndexSampler` (global shuffle
per epoch from `seed`), and each example's random augmentation from a generator grain
keys on (seed, global index), so a loader's output depends only on the seed and
process_index/process_count, not on num_workers (`WorkerBatchOrder`) or prefetching.
With several processes each global batch is the single-process one, cut into
per-process slices (`GlobalBatchSlice`).
`it = iter(loader); state = it.get_state()` returns `bytes` (UTF-8 JSON, e.g.
`state.decode()` is a JSON string); `iter(loader).set_state(state)` continues with
exactly the batches the saved iterator would have produced. For Orbax, store
`state.decode()` as a string, or use `grain.checkpoint.CheckpointSave(it)` /
`CheckpointRestore(it)` inside `ocp.args.Composite`.

Any TFDS builder with an image feature and a segmentation feature works: set
`dataset.name`, `image_key`, `label_key`, `num_classes`, `eval_pad_size`.
"""

from __future__ import annotations

import math
import sys

import grain
import ml_collections
from ml_collections import config_dict
from absl import flags
import numpy as np

from segjax.data import digit_scenes
from segjax.data import sources
from segjax.data import transforms

REQUIRED_FIELDS = (
    'name', 'data_dir', 'train_split', 'eval_split', 'image_key', 'label_key',
    'num_classes', 'ignore_label', 'crop_size', 'eval_pad_size', 'scale_range',
    'hflip', 'color_jitter', 'mean', 'std', 'num_workers', 'prefetch',
)


def default_dataset_config() -> ml_collections.ConfigDict:
  """`config.dataset` for digit_scenes; config files override fields."""
  c = ml_collections.ConfigDict()
  c.name = 'digit_scenes'  # 'digit_scenes/tiny': 40/10/10 scenes, for smoke runs.
  # None: the TFDS default (~/tensorflow_datasets). A typed placeholder, because
  # `--config.dataset.data_dir=...` cannot override a plain None field.
  c.data_dir = config_dict.placeholder(str)
  c.train_split = 'train'
  c.eval_split = 'validation'
  c.image_key = 'image'
  c.label_key = 'segmentation'
  c.num_classes = digit_scenes.NUM_CLASSES
  c.ignore_label = digit_scenes.IGNORE_LABEL
  c.crop_size = (64, 64)
  c.eval_pad_size = (64, 64)
  # Digits are 14-30 px high; 0.75-1.5 keeps the smallest legible (>= 10 px).
  c.scale_range = (0.75, 1.5)
  c.hflip = False  # A mirrored digit is not the same digit.
  c.color_jitter = 0.2
  # Per-channel mean/std of digit_scenes train images (measured over all 4000).
  c.mean = (127.7, 126.9, 128.2)
  c.std = (57.9, 57.6, 58.1)
  c.num_workers = 0  # 0: transforms run in the calling process.
  # Records read ahead by up to 4 grain reader threads; 0: read in the calling thread.
  # digit_scenes' records (two 64x64 PNGs) decode in ~0.25 ms, mostly Python holding
  # the GIL, and threads only contend for it: 0 gave 1382-1461 img/s against 1074 with
  # 16 (fcn8s preset, 2 cores). Full-size JPEGs decode with the GIL released, and the
  # VOC/Cityscapes presets set 16 (134-147 against 108-114 img/s at 512x512 crops).
  # experiments/benchmarks/README.md, "Input pipeline in one thread".
  c.prefetch = 0
  return c


def _check_config(config) -> None:
  missing = [f for f in REQUIRED_FIELDS if f not in config]
  if missing:
    raise ValueError(
        f'dataset config lacks fields {missing}; start from '
        'segjax.data.pipeline.default_dataset_config().'
    )
  if int(config.num_workers) < 0:
    raise ValueError(f'dataset.num_workers must be >= 0, got {config.num_workers}.')
  if int(config.prefetch) < 0:
    raise ValueError(f'dataset.prefetch must be >= 0, got {config.prefetch}.')


def _process_batch_size(
    global_batch_size: int, process_index: int | None, process_count: int | None
) -> tuple[int, int, int]:
  """-> (per-process batch size, process_index, process_count)."""
  if process_index is None or process_count is None:
    import jax  # Only when asked to find the processes itself.

    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  if not 0 <= process_index < process_count:
    raise ValueError(
        f'process_index {process_index} must be in [0, process_count={process_count}).'
    )
  if global_batch_size <= 0 or global_batch_size % process_count:
    raise ValueError(
        f'global_batch_size {global_batch_size} must be a positive multiple of '
        f'process_count {process_count}.'
    )
  return global_batch_size // process_count, process_index, process_count


def _ensure_absl_flags_parsed(num_workers: int) -> None:
  # grain's worker processes read absl flags (--grain_*); outside `absl.app.run`
  # (tests, notebooks) nothing has parsed them and the first batch would raise
  # UnparsedFlagAccessError. Defaults are what we want, so mark them parsed.
  if num_workers > 0 and not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


def _read_options(config) -> grain.ReadOptions:
  prefetch = int(config.prefetch)
  # Reader threads decode PNGs (Pillow releases the GIL); more than a few only
  # contend on small machines.
  return grain.ReadOptions(
      num_threads=min(prefetch, 4), prefetch_buffer_size=prefetch
  )


def create_train_loader(
    dataset_config,
    *,
    global_batch_size: int,
    seed: int,
    num_train_steps: int | None = None,
    process_index: int | None = None,
    process_count: int | None = None,
) -> grain.DataLoader:
  """Infinite, shuffled, augmented per-process batches of `dataset_config.train_split`.

  Yields {'image': float32 [b, H, W, 3], 'label': int32 [b, H, W]} with (H, W) =
  crop_size and b = global_batch_size // process_count. `seed` is a 32-bit
  non-negative int. `num_train_steps` is accepted for the trainer's convenience and
  does not bound the loader (the trainer stops it).
  """
  del num_train_steps  # The loader repeats forever; the trainer counts steps.
  _check_config(dataset_config)
  c = dataset_config
  batch_size, process_index, process_count = _process_batch_size(
      global_batch_size, process_index, process_count
  )
  if not isinstance(seed, (int, np.integer)) or not 0 <= seed < 2**32:
    raise ValueError(f'seed must be an int in [0, 2**32), got {seed!r}.')
  source = sources.load_data_source(c.name, c.train_split, c.data_dir,
                                    features=(c.image_key, c.label_key))
  if len(source) < process_count:
    raise ValueError(
        f'Split {c.train_split!r} of {c.name!r} has {len(source)} examples, fewer '
        f'than process_count {process_count}.'
    )
  shard_options = grain.sharding.ShardOptions(
      shard_index=process_index, shard_count=process_count, drop_remainder=True
  )
  sampler = grain.samplers.IndexSampler(
      num_records=len(source),
      shard_options=shard_options,
      shuffle=True,
      num_epochs=None,
      seed=int(seed),
  )
  if process_count > 1:
    sampler = GlobalBatchSlice(len(source), int(seed), global_batch_size,
                               process_index, process_count)
    shard_options = grain.sharding.NoSharding()
  ops = [
      transforms.DecodeExample(
          c.image_key, c.label_key, c.num_classes, c.ignore_label
      )
  ]
  if tuple(c.scale_range) != (1.0, 1.0):
    ops.append(transforms.RandomScale(c.scale_range))
  if c.color_jitter:
    ops.append(transforms.ColorJitter(c.color_jitter))
  ops.append(transforms.RandomCrop(c.crop_size, c.mean, c.ignore_label))
  if c.hflip:
    ops.append(transforms.RandomHorizontalFlip(0.5))
  ops += [
      transforms.Normalize(c.mean, c.std),
      grain.transforms.Batch(batch_size, drop_remainder=True),
  ]
  return _data_loader(c, source, sampler, ops, shard_options, batch_size)


def _data_loader(c, source, sampler, ops, shard_options, batch_size: int) -> grain.DataLoader:
  """grain's loader of `source` in `sampler`'s order; with worker processes, the sampler
  is reordered (`WorkerBatchOrder`) so that the batches are those of num_workers=0."""
  _ensure_absl_flags_parsed(int(c.num_workers))
  if int(c.num_workers) > 0:
    sampler = WorkerBatchOrder(sampler, batch_size, int(c.num_workers), shard_options)
  return grain.DataLoader(
      data_source=source,
      sampler=sampler,
      operations=ops,
      worker_count=int(c.num_workers),
      shard_options=shard_options,
      read_options=_read_options(c),
  )


def eval_padded_size(num_records: int, global_batch_size: int, num_workers: int) -> int:
  """Records an eval split is padded to: full global batches, as many for each worker.

  Each grain worker process batches its own records (dropping a partial batch), so
  with W workers the padded length is a multiple of W global batches: no worker
  drops a real record. The extra batches are padding only (`valid` all False).
  """
  step = global_batch_size * max(int(num_workers), 1)
  return math.ceil(num_records / step) * step


class WorkerBatchOrder:
  """`sampler` reordered so that grain's worker processes yield the one-process batches.

  With W worker processes, grain hands the loader's local index l (after process
  sharding) to worker l % W; each worker batches the records it gets, and the loader
  takes the workers' batches in turn, so worker k's j-th batch is the loader's batch
  j * W + k. Without reordering, the loader's batch 0 would hold local records
  0, W, 2W, ..., not 0..B-1. Here local index l = k + W * (j * B + t) reads position
  (j * W + k) * B + t of `sampler`, with that position's random generator: the same
  batches, in the same order and with the same augmentations, for any worker count.
  (grain's iterator state still records the worker count: resume with the same one.)
  """

  def __init__(self, sampler, batch_size: int, worker_count: int,
               shard_options: grain.sharding.ShardOptions):
    self._sampler = sampler
    self._batch = int(batch_size)
    self._workers = int(worker_count)
    self._shard_index = shard_options.shard_index
    self._shard_count = shard_options.shard_count
    self._len = len(sampler) if hasattr(sampler, '__len__') else sys.maxsize

  def __len__(self) -> int:
    return self._len

  def __getitem__(self, index: int) -> grain.RecordMetadata:
    if not 0 <= index < self._len:
      raise IndexError(f'Index {index} out of range [0, {self._len}).')
    local = (index - self._shard_index) // self._shard_count
    worker, per_worker = local % self._workers, local // self._workers
    batch, offset = divmod(per_worker, self._batch)
    position = (batch * self._workers + worker) * self._batch + offset
    metadata = self._sampler[position * self._shard_count + self._shard_index]
    return grain.RecordMetadata(index=index, record_key=metadata.record_key, rng=metadata.rng)

  def __repr__(self) -> str:
    return (f'WorkerBatchOrder({self._sampler!r}, batch_size={self._batch}, '
            f'worker_count={self._workers})')


class GlobalBatchSlice:
  """The one-process train order, each global batch cut into per-process slices.

  Process p's local example k is global example g = (k // b) * B + p * b + k % b
  (b per-process, B global batch size) of the unsharded shuffled sampler, with that
  example's augmentation generator: together the processes' batches are exactly
  the single-process global batches, so N processes train on the same data, in
  the same order, as one process with the same global batch size.
  """

  def __init__(self, num_records: int, seed: int, global_batch_size: int,
               process_index: int, process_count: int):
    self._global = grain.samplers.IndexSampler(
        num_records=num_records, shard_options=grain.sharding.NoSharding(), shuffle=True,
        num_epochs=None, seed=seed)
    self._batch = global_batch_size // process_count
    self._global_batch = global_batch_size
    self._offset = process_index * self._batch

  def __getitem__(self, index: int) -> grain.RecordMetadata:
    position = (index // self._batch) * self._global_batch + self._offset + index % self._batch
    metadata = self._global[position]
    return grain.RecordMetadata(index=index, record_key=metadata.record_key, rng=metadata.rng)

  def __repr__(self) -> str:
    # Without the process's offset: every process stands at the same local index, so
    # the one iterator state a checkpoint holds (Orbax writes process 0's) restores
    # every process, and grain validates a restored state against this repr.
    return (f'GlobalBatchSlice({self._global!r}, per_process_batch={self._batch}, '
            f'global_batch={self._global_batch})')


class PaddedDataSource:
  """`source` extended to `num_records` by records `{PADDING_KEY: True}`."""

  def __init__(self, source, num_records: int):
    if num_records < len(source):
      raise ValueError(f'num_records {num_records} < len(source) {len(source)}.')
    self.source = source
    self.num_records = num_records

  def __len__(self) -> int:
    return self.num_records

  def __getitem__(self, index: int):
    if index < len(self.source):
      return self.source[index]
    if index < self.num_records:
      return {transforms.PADDING_KEY: True}
    raise IndexError(f'Index {index} out of range [0, {self.num_records}).')

  def __repr__(self) -> str:
    return f'PaddedDataSource({self.source!r}, num_records={self.num_records})'


def create_eval_loader(
    dataset_config,
    *,
    global_batch_size: int,
    process_index: int | None = None,
    process_count: int | None = None,
) -> grain.DataLoader:
  """One deterministic pass over `dataset_config.eval_split`, in full batches.

  Yields {'image': float32 [b, Hp, Wp, 3], 'label': int32 [b, Hp, Wp],
  'valid': bool [b, Hp, Wp]} with (Hp, Wp) = eval_pad_size; every process yields
  ceil(n / global_batch_size) batches, rounded up to a multiple of num_workers when
  there are worker processes (`eval_padded_size`; the extra batches are padding only).
  Count real pixels with `valid`, never by batch size.
  """
  _check_config(dataset_config)
  c = dataset_config
  batch_size, process_index, process_count = _process_batch_size(
      global_batch_size, process_index, process_count
  )
  source = sources.load_data_source(c.name, c.eval_split, c.data_dir,
                                    features=(c.image_key, c.label_key))
  num_padded = eval_padded_size(len(source), global_batch_size, c.num_workers)
  source = PaddedDataSource(source, num_padded)
  shard_options = grain.sharding.ShardOptions(
      shard_index=process_index, shard_count=process_count, drop_remainder=False
  )
  sampler = grain.samplers.IndexSampler(
      num_records=num_padded,
      shard_options=shard_options,
      shuffle=False,
      num_epochs=1,
  )
  ops = [
      transforms.DecodeExample(
          c.image_key, c.label_key, c.num_classes, c.ignore_label
      ),
      transforms.PadToSize(c.eval_pad_size, c.mean, c.ignore_label),
      transforms.Normalize(c.mean, c.std),
      grain.transforms.Batch(batch_size, drop_remainder=True),
  ]
  return _data_loader(c, source, sampler, ops, shard_options, batch_size)
