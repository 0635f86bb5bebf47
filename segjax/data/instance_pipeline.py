"""grain input pipelines for instance segmentation (Faster / Mask R-CNN), static shapes.

    loader = create_train_loader(config.dataset, global_batch_size=16, seed=0)
    batch = next(iter(loader))
    batch['image']       float32 [b, Hp, Wp, 3] normalised, padded bottom/right to pad_size
    batch['image_size']  int32 [b, 2] (h, w) of the resized image inside the padding
    batch['gt_boxes']    float32 [b, M, 4] (x1, y1, x2, y2) pixels of the resized image
    batch['gt_labels']   int32 [b, M]: 0 = background/padding, k + 1 for dataset class k
    batch['gt_valid']    bool [b, M]; M = max_instances
    batch['gt_masks']    uint8 [b, M, Hp, Wp] 0/1
    batch['image_id']    int64 [b] (-1 for eval padding examples)
    batch['scale']       float32 [b, 2] (resized / original) for rows, columns
    batch['orig_size']   int32 [b, 2] (H, W) of the original image

Source: any TFDS record with `image` and `objects` = {bbox normalised (ymin, xmin,
ymax, xmax), label, mask list of [H, W, 1]} (`digit_scenes`, `voc_segmentation`,
`coco_instances`). Boxes are clipped to the image; objects flagged `is_crowd` (COCO)
and objects whose clipped box is under MIN_BOX_SIZE pixels wide or high (degenerate
annotations, boxes outside the image) are not training targets, as in torchvision's
detection reference, which drops them;
COCO evaluation still sees the crowd regions (`coco_eval`). Transforms, in order:
`DecodeInstances` -> `ResizeInstances` (torchvision's GeneralizedRCNNTransform rule:
scale = min(min_size / short side, max_size / long side); image bilinear, masks
nearest, boxes by the per-axis ratio) -> `RandomHorizontalFlipInstances` (optional; off
for digits: a mirrored 2 is not a 2) -> `PadInstances` -> `Normalize`.

More than `max_instances` objects in an image: the first `max_instances` (in record
order) are kept for training; evaluation ground truth comes from the full records
(`segjax.evaluation.coco_eval`), so nothing is dropped from the metric.

Determinism and resume are those of `segjax.data.pipeline` (same sampler, same
sharding, same helpers): the order depends only on the seed and the process index, and
`iter(loader).get_state()` / `set_state()` resume exactly.
"""

from __future__ import annotations

import math

import grain
import ml_collections
import numpy as np
from ml_collections import config_dict
from PIL import Image

from segjax.data import digit_scenes, pipeline, sources, transforms

REQUIRED_FIELDS = ('name', 'data_dir', 'train_split', 'eval_split', 'num_classes', 'min_size',
                   'max_size', 'pad_size', 'max_instances', 'hflip', 'mean', 'std',
                   'num_workers', 'prefetch')

# Datasets with an instance-segmentation builder in segjax.
INSTANCE_DATASETS = ('digit_scenes', 'voc_segmentation', 'coco_instances')


def default_instance_dataset_config() -> ml_collections.ConfigDict:
  """`config.dataset` of the detection configs: digit_scenes at its native 64x64."""
  c = ml_collections.ConfigDict()
  c.name = 'digit_scenes'  # 'digit_scenes/tiny' for smoke runs
  c.data_dir = config_dict.placeholder(str)
  c.train_split = 'train'
  c.eval_split = 'validation'
  c.num_classes = digit_scenes.NUM_CLASSES  # background + 10 digits
  c.min_size = 64  # torchvision GeneralizedRCNNTransform: (800, 1333) for COCO
  c.max_size = 64
  c.pad_size = (64, 64)  # static (H, W) every resized image is padded to
  c.max_instances = digit_scenes.MAX_DIGITS
  c.hflip = False
  c.mean = (127.7, 126.9, 128.2)
  c.std = (57.9, 57.6, 58.1)
  c.num_workers = 0
  # 0: records read in the calling thread, faster for digit_scenes' small records
  # (1516-1627 against 932-1125 img/s with 16; see pipeline.default_dataset_config).
  # The COCO preset reads full-size JPEGs in 16-record reader threads.
  c.prefetch = 0
  return c


def validate_instance_dataset_config(c) -> None:
  """Raises ValueError naming the bad field value and the valid choices."""
  missing = [f for f in REQUIRED_FIELDS if f not in c]
  if missing:
    raise ValueError(f'dataset config lacks fields {missing}; start from '
                     'segjax.data.instance_pipeline.default_instance_dataset_config().')
  base = str(c.name).split('/')[0]
  if base not in INSTANCE_DATASETS:
    raise ValueError(
        f'config.dataset.name={c.name!r} has no instance-segmentation builder in segjax yet; '
        f'valid: {list(INSTANCE_DATASETS)} (and their configs, e.g. "digit_scenes/tiny"; '
        'TFDS coco/2017 has no instance masks).')
  sources.validate_dataset_name(c.name)
  for field in ('min_size', 'max_size', 'max_instances'):
    value = c[field]
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
      raise ValueError(f'config.dataset.{field}={value!r} must be a positive integer')
  if c.min_size > c.max_size:
    raise ValueError(f'config.dataset.min_size={c.min_size} must be <= max_size={c.max_size}')
  transforms._pair(c.pad_size, 'config.dataset.pad_size')  # pylint: disable=protected-access
  if not isinstance(c.hflip, bool):
    raise ValueError(f'config.dataset.hflip={c.hflip!r} must be True or False')
  if c.num_classes < 2:
    raise ValueError(f'config.dataset.num_classes={c.num_classes!r} must be >= 2')


# Smaller clipped boxes are dropped: resizing can round a thinner one to zero width in
# float32 (found by tests/test_fuzz_inputs.py), and the box coder divides by widths.
MIN_BOX_SIZE = 0.01


class DecodeInstances(grain.transforms.Map):
  """Record -> image uint8 [H, W, 3], boxes float32 [n, 4] pixels, labels int32 [n] (+1),
  masks uint8 [n, H, W], image_id. Padding records pass through."""

  def map(self, element: dict) -> dict:
    if element.get(transforms.PADDING_KEY, False):
      return element
    image = element['image']
    transforms.check_image_and_label(image, np.zeros(image.shape[:2], np.uint8))
    height, width = image.shape[:2]
    objects = element['objects']
    bbox = np.asarray(objects['bbox'], np.float32).reshape(-1, 4)
    boxes = np.clip(bbox[:, [1, 0, 3, 2]], 0.0, 1.0) * np.asarray(
        [width, height, width, height], np.float32)
    labels = np.asarray(objects['label'], np.int64).reshape(-1) + 1
    masks = [np.asarray(m).reshape(height, width) for m in objects['mask']]
    masks = (np.stack(masks) if masks else np.zeros((0, height, width))).astype(np.uint8)
    # Crowd regions and zero-size boxes are no training targets (module docstring).
    keep = ((boxes[:, 2] - boxes[:, 0] >= MIN_BOX_SIZE)
            & (boxes[:, 3] - boxes[:, 1] >= MIN_BOX_SIZE))
    if 'is_crowd' in objects:
      keep &= ~np.asarray(objects['is_crowd'], bool).reshape(-1)
    if not keep.all():
      boxes, labels, masks = boxes[keep], labels[keep], masks[keep]
    return {'image': image, 'boxes': boxes, 'labels': labels.astype(np.int32), 'masks': masks,
            'image_id': np.int64(element.get('image_id', -1))}


def resize_scale(height: int, width: int, min_size: int, max_size: int) -> float:
  """torchvision's rule: the short side to min_size unless the long side passes max_size."""
  return min(min_size / min(height, width), max_size / max(height, width))


class ResizeInstances(grain.transforms.Map):
  """Resizes image (bilinear), masks (nearest) and boxes; adds 'scale' and 'orig_size'."""

  def __init__(self, min_size: int, max_size: int):
    self.min_size, self.max_size = int(min_size), int(max_size)

  def map(self, element: dict) -> dict:
    if element.get(transforms.PADDING_KEY, False):
      return element
    image = element['image']
    height, width = image.shape[:2]
    s = resize_scale(height, width, self.min_size, self.max_size)
    new_h, new_w = max(1, int(math.floor(height * s))), max(1, int(math.floor(width * s)))
    out = dict(element, orig_size=np.asarray([height, width], np.int32),
               scale=np.asarray([new_h / height, new_w / width], np.float32))
    if (new_h, new_w) == (height, width):
      return out
    out['image'] = np.asarray(Image.fromarray(image).resize((new_w, new_h),
                                                            Image.Resampling.BILINEAR))
    rows = transforms._nearest_indices(height, new_h)  # pylint: disable=protected-access
    cols = transforms._nearest_indices(width, new_w)  # pylint: disable=protected-access
    out['masks'] = element['masks'][:, rows[:, None], cols[None, :]]
    # Clipped: in float32, 11 * (29 / 11) is 29.000002, outside a 29-pixel-wide image.
    out['boxes'] = np.clip(element['boxes'] * np.asarray(
        [new_w / width, new_h / height, new_w / width, new_h / height], np.float32),
        0.0, np.asarray([new_w, new_h, new_w, new_h], np.float32))
    return out


class RandomHorizontalFlipInstances(grain.transforms.RandomMap):
  """Mirrors image, masks and boxes (x -> w - x) with probability p."""

  def __init__(self, p: float = 0.5):
    self.p = float(p)

  def random_map(self, element: dict, rng: np.random.Generator) -> dict:
    if element.get(transforms.PADDING_KEY, False) or rng.uniform() >= self.p:
      return element
    width = element['image'].shape[1]
    boxes = element['boxes'].copy()
    boxes[:, [0, 2]] = width - element['boxes'][:, [2, 0]]
    return dict(element, image=element['image'][:, ::-1], masks=element['masks'][:, :, ::-1],
                boxes=boxes)


class PadInstances(grain.transforms.Map):
  """Pads the image to `pad_size` (with `pad_value`, 0 after Normalize) and the instances
  to `max_instances`; produces the batch keys of the module docstring."""

  def __init__(self, pad_size, max_instances: int, pad_value):
    self.pad_size = transforms._pair(pad_size, 'pad_size')  # pylint: disable=protected-access
    self.max_instances = int(max_instances)
    self.pad_value = transforms.ChannelTiles(pad_value, 'pad_value')

  def map(self, element: dict) -> dict:
    ph, pw = self.pad_size
    m = self.max_instances
    image = self.pad_value(ph, pw).copy()
    out = {'image': image, 'image_size': np.asarray([ph, pw], np.int32),
           'gt_boxes': np.zeros((m, 4), np.float32), 'gt_labels': np.zeros((m,), np.int32),
           'gt_valid': np.zeros((m,), bool), 'gt_masks': np.zeros((m, ph, pw), np.uint8),
           'image_id': np.int64(-1), 'scale': np.ones((2,), np.float32),
           'orig_size': np.asarray([ph, pw], np.int32)}
    if element.get(transforms.PADDING_KEY, False):
      return out
    h, w = element['image'].shape[:2]
    if h > ph or w > pw:
      raise ValueError(f'resized image of {h}x{w} does not fit dataset.pad_size={self.pad_size}')
    image[:h, :w] = element['image']
    n = min(len(element['labels']), m)
    out['gt_boxes'][:n] = element['boxes'][:n]
    out['gt_labels'][:n] = element['labels'][:n]
    out['gt_valid'][:n] = True
    out['gt_masks'][:n, :h, :w] = element['masks'][:n]
    out.update(image_size=np.asarray([h, w], np.int32), image_id=np.int64(element['image_id']),
               scale=element['scale'], orig_size=element['orig_size'])
    return out


def _ops(c, batch_size: int, train: bool) -> list:
  ops = [DecodeInstances(), ResizeInstances(c.min_size, c.max_size)]
  if train and c.hflip:
    ops.append(RandomHorizontalFlipInstances(0.5))
  ops += [PadInstances(c.pad_size, c.max_instances, c.mean),
          transforms.Normalize(c.mean, c.std),
          grain.transforms.Batch(batch_size, drop_remainder=True)]
  return ops


def create_train_loader(dataset_config, *, global_batch_size: int, seed: int,
                        process_index: int | None = None,
                        process_count: int | None = None) -> grain.DataLoader:
  """Infinite shuffled per-process batches of the train split (keys: module docstring)."""
  c = dataset_config
  validate_instance_dataset_config(c)
  batch_size, process_index, process_count = pipeline._process_batch_size(  # pylint: disable=protected-access
      global_batch_size, process_index, process_count)
  if not isinstance(seed, (int, np.integer)) or not 0 <= seed < 2**32:
    raise ValueError(f'seed must be an int in [0, 2**32), got {seed!r}.')
  source = sources.load_data_source(c.name, c.train_split, c.data_dir)
  shard_options = grain.sharding.ShardOptions(shard_index=process_index,
                                              shard_count=process_count, drop_remainder=True)
  sampler = grain.samplers.IndexSampler(num_records=len(source), shard_options=shard_options,
                                        shuffle=True, num_epochs=None, seed=int(seed))
  return pipeline._data_loader(  # pylint: disable=protected-access
      c, source, sampler, _ops(c, batch_size, True), shard_options, batch_size)


def create_eval_loader(dataset_config, *, global_batch_size: int,
                       process_index: int | None = None,
                       process_count: int | None = None) -> grain.DataLoader:
  """One pass over the eval split in full batches; padding examples have image_id -1."""
  c = dataset_config
  validate_instance_dataset_config(c)
  batch_size, process_index, process_count = pipeline._process_batch_size(  # pylint: disable=protected-access
      global_batch_size, process_index, process_count)
  source = sources.load_data_source(c.name, c.eval_split, c.data_dir)
  num_padded = pipeline.eval_padded_size(len(source), global_batch_size, c.num_workers)
  source = pipeline.PaddedDataSource(source, num_padded)
  shard_options = grain.sharding.ShardOptions(shard_index=process_index,
                                              shard_count=process_count, drop_remainder=False)
  sampler = grain.samplers.IndexSampler(num_records=num_padded, shard_options=shard_options,
                                        shuffle=False, num_epochs=1)
  return pipeline._data_loader(  # pylint: disable=protected-access
      c, source, sampler, _ops(c, batch_size, False), shard_options, batch_size)
