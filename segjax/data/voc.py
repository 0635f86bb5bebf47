"""`voc_segmentation`: PASCAL VOC 2012 segmentation (+ SBD `train_aug`) from downloaded files.

TFDS's own `voc/2012` has no segmentation masks; this builder reads the VOCdevkit the
user downloaded (and, for `train_aug`, the Semantic Boundaries Dataset) and never
imports TensorFlow.

Layout (`--manual_dir` is VOCdevkit, VOC2012 itself, or a folder holding VOCdevkit):
  VOC2012/JPEGImages/<id>.jpg
  VOC2012/SegmentationClass/<id>.png      palette PNG: index = class 0-20, 255 = void
  VOC2012/SegmentationObject/<id>.png     palette PNG: index = instance 1..n, 255 = void
  VOC2012/ImageSets/Segmentation/{train,val}.txt
  benchmark_RELEASE/dataset/{cls,inst}/<id>.mat, {train,val}.txt   (config `aug` only;
      next to VOC2012, inside --manual_dir, or next to it)

Configs and splits:
  default   train 1,464 (train.txt), validation 1,449 (val.txt)
  aug       the same plus train_aug: (SBD train + SBD val + VOC train) - VOC val, 10,582
            images with the full downloads. A train_aug image's labels come from VOC's
            PNGs when VOC has them (the VOC train images), else from SBD's .mat files
            (`GTcls.Segmentation`, `GTinst.Segmentation`, `GTinst.Categories`); SBD has
            no void border, so those images have no 255 pixels.

Features (image sizes vary, at most 500 x 500):
  image          uint8 [H, W, 3] (the original JPEG bytes)
  segmentation   uint8 [H, W, 1]: 0 = background, 1..20 = classes, 255 = void/ignore
  objects        Sequence: bbox (normalised ymin, xmin, ymax, xmax of the mask, max edges
                 exclusive), label ClassLabel(20) = semantic class - 1, mask uint8
                 [H, W, 1] 0/1 (void pixels excluded), one per instance id of the object PNG
  image_id       int64: the name's digits, '2007_000032' -> 2007000032
  file_name      the image name, '2007_000032'

An instance's class is the most frequent non-void, non-background class of its pixels
in SegmentationClass (VOC draws both from the same polygons, so it is unique).

Bad inputs: a missing folder or list file stops the build naming the path. A corrupt
image, a label PNG whose size differs from its image, a label PNG that is not palette
mode, a palette index outside 0-20/255, or an instance with no class pixels raises
`BadExampleError` naming the file, or with `--skip_bad_examples` is logged, counted
and skipped (`segjax.data.manual_files`).
"""

from __future__ import annotations

import dataclasses
import os
import re

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from segjax.data import manual_files
from segjax.data.manual_files import BadExampleError, ManualFilesError

CLASS_NAMES = (
    'background', 'aeroplane', 'bicycle', 'bird', 'boat', 'bottle', 'bus', 'car', 'cat',
    'chair', 'cow', 'diningtable', 'dog', 'horse', 'motorbike', 'person', 'pottedplant',
    'sheep', 'sofa', 'train', 'tvmonitor')
NUM_CLASSES = len(CLASS_NAMES)  # 21, background included
IGNORE_LABEL = 255
_NAME = re.compile(r'^(\d{4})_(\d{6})$')


def image_id(name: str) -> int:
  """'2007_000032' -> 2007000032; BadExampleError for a name of another form."""
  if not _NAME.match(name):
    raise BadExampleError(f'image name {name!r} is not of the VOC form YYYY_NNNNNN.')
  return int(name.replace('_', ''))


def find_voc_root(manual_dir: str) -> str:
  """The VOC2012 folder under `manual_dir` (itself, VOC2012/ or VOCdevkit/VOC2012/)."""
  for candidate in (manual_dir, os.path.join(manual_dir, 'VOC2012'),
                    os.path.join(manual_dir, 'VOCdevkit', 'VOC2012')):
    if os.path.isdir(os.path.join(candidate, 'JPEGImages')):
      return candidate
  raise ManualFilesError(
      f'No VOC2012 folder under {manual_dir}: expected {manual_dir}/VOC2012/JPEGImages (give '
      'the VOCdevkit folder as --manual_dir), or JPEGImages/ directly inside it.')


def find_sbd_root(manual_dir: str, voc_root: str) -> str:
  """SBD's benchmark_RELEASE/dataset folder near `manual_dir` or VOC2012."""
  candidates = []
  for base in (manual_dir, os.path.dirname(os.path.normpath(manual_dir)), voc_root,
               os.path.dirname(os.path.normpath(voc_root)),
               os.path.dirname(os.path.dirname(os.path.normpath(voc_root)))):
    candidates += [os.path.join(base, 'benchmark_RELEASE', 'dataset'), os.path.join(base, 'dataset')]
  for candidate in candidates:
    if os.path.isdir(os.path.join(candidate, 'cls')):
      return candidate
  raise ManualFilesError(
      'The voc_segmentation/aug config needs SBD: expected benchmark_RELEASE/dataset/cls/ '
      f'next to VOC2012 or in --manual_dir; looked in {sorted(set(candidates))}.')


def train_aug_names(voc_train: list[str], voc_val: list[str], sbd_train: list[str],
                    sbd_val: list[str]) -> list[str]:
  """(SBD train + SBD val + VOC train) - VOC val, sorted: the 10,582 of DeepLab's train_aug."""
  return sorted((set(sbd_train) | set(sbd_val) | set(voc_train)) - set(voc_val))


def instances_from_maps(semantic: np.ndarray, instance_ids: np.ndarray, path: str,
                        categories: dict[int, int] | None = None) -> list[tuple[np.ndarray, int]]:
  """[(mask [H, W] bool, class 1..20)] of every instance id (not 0 or 255) in `instance_ids`.

  categories: instance id -> class (SBD's GTinst.Categories); None: each instance takes
  the most frequent class 1..20 of its pixels in `semantic` (VOC).
  """
  out = []
  for k in np.unique(instance_ids):
    if k in (0, IGNORE_LABEL):
      continue
    mask = instance_ids == k
    if categories is not None:
      if int(k) not in categories:
        raise BadExampleError(f'{path}: instance {int(k)} has no entry in GTinst.Categories '
                              f'(which lists {len(categories)} instances).')
      cls = categories[int(k)]
    else:
      values = semantic[mask]
      values = values[(values > 0) & (values < NUM_CLASSES)]
      if values.size == 0:
        raise BadExampleError(f'{path}: instance {int(k)} covers no class pixels (1-20) in the '
                              'matching SegmentationClass PNG; expected every object to have a '
                              'class.')
      cls = int(np.bincount(values).argmax())
    if not 1 <= cls < NUM_CLASSES:
      raise BadExampleError(f'{path}: instance {int(k)} has class {cls}; expected 1-20.')
    out.append((mask, cls))
  return out


def _load_sbd_mat(path: str, key: str):
  from scipy import io as scipy_io  # pylint: disable=import-outside-toplevel

  try:
    return scipy_io.loadmat(path, squeeze_me=True, struct_as_record=False)[key]
  except (OSError, ValueError, KeyError, TypeError) as error:
    raise BadExampleError(f'{path}: cannot read the SBD struct {key!r} ({error!r}); expected '
                          f'a .mat file holding {key}.Segmentation.') from None


@dataclasses.dataclass(eq=False)
class VocConfig(tfds.core.BuilderConfig):
  with_train_aug: bool = False


class VocSegmentation(manual_files.ManualBuilder):
  """PASCAL VOC 2012 segmentation (class + object masks), optionally with SBD train_aug."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Initial release.'}
  BUILDER_CONFIGS = [
      VocConfig(name='default', description='VOC 2012 train (1,464) and val (1,449).'),
      VocConfig(name='aug', with_train_aug=True,
                description='Plus train_aug (10,582) from SBD; needs benchmark_RELEASE.'),
  ]
  DEFAULT_BUILDER_CONFIG_NAME = 'default'
  MANUAL_DOWNLOAD_INSTRUCTIONS = """
  VOCdevkit/VOC2012/{JPEGImages,SegmentationClass,SegmentationObject,ImageSets/Segmentation}
  from VOCtrainval_11-May-2012.tar (pass VOCdevkit as --manual_dir); for the `aug` config
  also SBD's benchmark_RELEASE/ (benchmark.tgz) next to VOC2012 or inside --manual_dir.
  """
  code_path = epath.Path(__file__)

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description='PASCAL VOC 2012 semantic + instance segmentation from the VOCdevkit.',
        features=tfds.features.FeaturesDict({
            'image': tfds.features.Image(shape=(None, None, 3), encoding_format='jpeg'),
            'segmentation': tfds.features.Image(shape=(None, None, 1)),
            'objects': tfds.features.Sequence({
                'bbox': tfds.features.BBoxFeature(),
                'label': tfds.features.ClassLabel(names=list(CLASS_NAMES[1:])),
                'mask': tfds.features.Image(shape=(None, None, 1)),
            }),
            'image_id': np.int64,
            'file_name': tfds.features.Text(),
        }),
        supervised_keys=('image', 'segmentation'),
        homepage='http://host.robots.ox.ac.uk/pascal/VOC/voc2012/',
        metadata=tfds.core.MetadataDict(),
    )

  def _split_generators(self, dl_manager):
    manual_dir = self._manual_root(dl_manager)
    voc = find_voc_root(manual_dir)
    for sub, what in (('JPEGImages', 'the VOC images'),
                      ('SegmentationClass', 'the VOC class PNGs'),
                      ('SegmentationObject', 'the VOC object PNGs')):
      manual_files.require_dir(os.path.join(voc, sub), what)
    lists = os.path.join(voc, 'ImageSets', 'Segmentation')
    train = manual_files.read_split_list(os.path.join(lists, 'train.txt'), 'the VOC train list')
    val = manual_files.read_split_list(os.path.join(lists, 'val.txt'), 'the VOC val list')
    splits = {'train': [(n, 'voc') for n in train], 'validation': [(n, 'voc') for n in val]}
    if self.builder_config.with_train_aug:
      sbd = find_sbd_root(manual_dir, voc)
      manual_files.require_dir(os.path.join(sbd, 'inst'), 'the SBD instance .mat files')
      sbd_train = manual_files.read_split_list(os.path.join(sbd, 'train.txt'), 'the SBD train list')
      sbd_val = manual_files.read_split_list(os.path.join(sbd, 'val.txt'), 'the SBD val list')
      voc_labelled = set(train) | set(val)
      splits['train_aug'] = [(n, 'voc' if n in voc_labelled else 'sbd')
                             for n in train_aug_names(train, val, sbd_train, sbd_val)]
      self._sbd = sbd
    self._voc = voc
    return {split: self._generate_examples(split, items) for split, items in splits.items()}

  def _image_path(self, name: str, source: str) -> str:
    path = os.path.join(self._voc, 'JPEGImages', name + '.jpg')
    if source == 'sbd' and not os.path.isfile(path):
      path = os.path.join(self._sbd, 'img', name + '.jpg')
    if not os.path.isfile(path):
      raise ManualFilesError(f'Expected the image of {name!r} (listed in a split file) at '
                             f'{path}: no such file.')
    return path

  def _load(self, item: tuple[str, str]) -> tuple[str, dict]:
    name, source = item
    image_path = self._image_path(name, source)
    image_bytes, h, w = manual_files.read_rgb_image(image_path)
    if source == 'voc':
      cls_path = os.path.join(self._voc, 'SegmentationClass', name + '.png')
      obj_path = os.path.join(self._voc, 'SegmentationObject', name + '.png')
      for path in (cls_path, obj_path):
        manual_files.require_file(path, f'the label PNG of {name!r}')
      semantic = manual_files.read_png_indices(cls_path, 'the class PNG', palette=True)
      objects = manual_files.read_png_indices(obj_path, 'the object PNG', palette=True)
      manual_files.check_same_size(cls_path, semantic.shape, image_path, (h, w))
      manual_files.check_same_size(obj_path, objects.shape, image_path, (h, w))
      manual_files.check_values(cls_path, semantic, [*range(NUM_CLASSES), IGNORE_LABEL],
                                'palette index (class)')
      instances = instances_from_maps(semantic, objects, obj_path)
    else:
      cls_path = manual_files.require_file(os.path.join(self._sbd, 'cls', name + '.mat'),
                                           f'the SBD class .mat of {name!r}')
      inst_path = manual_files.require_file(os.path.join(self._sbd, 'inst', name + '.mat'),
                                            f'the SBD instance .mat of {name!r}')
      semantic = np.asarray(_load_sbd_mat(cls_path, 'GTcls').Segmentation)
      inst = _load_sbd_mat(inst_path, 'GTinst')
      objects = np.asarray(inst.Segmentation)
      categories = np.atleast_1d(np.asarray(inst.Categories)).astype(int).tolist()
      manual_files.check_same_size(cls_path, semantic.shape, image_path, (h, w))
      manual_files.check_same_size(inst_path, objects.shape, image_path, (h, w))
      manual_files.check_values(cls_path, semantic, range(NUM_CLASSES), 'class')
      semantic = semantic.astype(np.uint8)
      instances = instances_from_maps(
          semantic, objects, inst_path, {i + 1: c for i, c in enumerate(categories)})
    return name, {
        'image': image_bytes,
        'segmentation': manual_files.encode_png(semantic),
        'objects': {
            'bbox': [tfds.features.BBox(*manual_files.mask_bbox(m)) for m, _ in instances],
            'label': [c - 1 for _, c in instances],
            'mask': [manual_files.encode_png(m.astype(np.uint8)) for m, _ in instances],
        },
        'image_id': image_id(name),
        'file_name': name,
    }
