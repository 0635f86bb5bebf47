"""voc_segmentation: a tiny VOCdevkit + SBD written in the real formats, built without TF."""

import os

import numpy as np
import pytest
import scipy.io
from PIL import Image

from segjax.data import build, instance_pipeline, manual_files, pipeline, sources, voc

H, W = 32, 48
# Image index -> (class of object 1, class of object 2) in the VOC PNGs.
VOC_CLASSES = {1: (15, 8), 2: (8, 3), 3: (1, 20), 4: (12, 7)}
SBD_CLASSES = {2: (12, 5), 3: (5, 5), 5: (19, 2), 6: (4, 11)}  # 2 differs from VOC on purpose
VOC_TRAIN, VOC_VAL = (1, 2), (3, 4)
SBD_TRAIN, SBD_VAL = (2, 3, 5), (6,)
NAMES = {i: f'2007_{i:06d}' for i in range(1, 7)}


def _palette():
  return [v for i in range(256) for v in ((i * 37) % 256, (i * 91) % 256, (i * 53) % 256)]


def label_maps(index: int, classes: tuple[int, int], void: bool):
  """(semantic [H, W], instance ids [H, W]) with two rectangles, a 255 rim when `void`."""
  semantic = np.zeros((H, W), np.uint8)
  instances = np.zeros((H, W), np.uint8)
  boxes = [(2 + index, 3, 14 + index, 20), (16, 24, 30, 44)]
  for k, ((y0, x0, y1, x1), c) in enumerate(zip(boxes, classes), start=1):
    if void:
      semantic[y0 - 1:y1 + 1, x0 - 1:x1 + 1] = 255
      instances[y0 - 1:y1 + 1, x0 - 1:x1 + 1] = 255
    semantic[y0:y1, x0:x1] = c
    instances[y0:y1, x0:x1] = k
  return semantic, instances


def _save_palette_png(array, path):
  image = Image.fromarray(array, mode='P')
  image.putpalette(_palette())
  image.save(path)


def write_voc(root: str, with_sbd: bool = True) -> str:
  """A VOCdevkit (+ benchmark_RELEASE) under `root`; returns the VOCdevkit path."""
  rng = np.random.default_rng(0)
  voc_root = os.path.join(root, 'VOCdevkit', 'VOC2012')
  for sub in ('JPEGImages', 'SegmentationClass', 'SegmentationObject',
              'ImageSets/Segmentation'):
    os.makedirs(os.path.join(voc_root, sub), exist_ok=True)
  for i, name in NAMES.items():
    Image.fromarray(rng.integers(0, 256, (H, W, 3), dtype=np.uint8)).save(
        os.path.join(voc_root, 'JPEGImages', name + '.jpg'), quality=95)
  for i, classes in VOC_CLASSES.items():
    semantic, instances = label_maps(i, classes, void=True)
    _save_palette_png(semantic, os.path.join(voc_root, 'SegmentationClass', NAMES[i] + '.png'))
    _save_palette_png(instances, os.path.join(voc_root, 'SegmentationObject', NAMES[i] + '.png'))
  for split, ids in (('train', VOC_TRAIN), ('val', VOC_VAL)):
    with open(os.path.join(voc_root, 'ImageSets', 'Segmentation', split + '.txt'), 'w') as f:
      f.write(''.join(NAMES[i] + '\n' for i in ids))
  if with_sbd:
    sbd = os.path.join(root, 'benchmark_RELEASE', 'dataset')
    for sub in ('cls', 'inst', 'img'):
      os.makedirs(os.path.join(sbd, sub), exist_ok=True)
    for i, classes in SBD_CLASSES.items():
      semantic, instances = label_maps(i, classes, void=False)
      scipy.io.savemat(os.path.join(sbd, 'cls', NAMES[i] + '.mat'), {'GTcls': {
          'Segmentation': semantic, 'Boundaries': np.zeros((1, 20), object),
          'CategoriesPresent': np.unique(semantic[semantic > 0])}})
      scipy.io.savemat(os.path.join(sbd, 'inst', NAMES[i] + '.mat'), {'GTinst': {
          'Segmentation': instances, 'Boundaries': np.zeros((2, 1), object),
          'Categories': np.asarray(classes, np.uint8).reshape(-1, 1)}})
    for split, ids in (('train', SBD_TRAIN), ('val', SBD_VAL)):
      with open(os.path.join(sbd, split + '.txt'), 'w') as f:
        f.write(''.join(NAMES[i] + '\n' for i in ids))
  return os.path.join(root, 'VOCdevkit')


def _records(name, split, data_dir):
  source = sources.load_data_source(name, split, data_dir)
  return {str(r['file_name'].decode() if isinstance(r['file_name'], bytes) else r['file_name']): r
          for r in (source[i] for i in range(len(source)))}


@pytest.fixture(scope='module')
def built(tmp_path_factory):
  root = str(tmp_path_factory.mktemp('voc_files'))
  devkit = write_voc(root)
  data_dir = str(tmp_path_factory.mktemp('voc_tfds'))
  build.build_dataset('voc_segmentation', devkit, data_dir, num_threads=2)
  build.build_dataset('voc_segmentation/aug', devkit, data_dir, num_threads=2)
  return root, data_dir


def test_split_membership(built):
  _, data_dir = built
  assert sorted(_records('voc_segmentation', 'train', data_dir)) == [NAMES[1], NAMES[2]]
  assert sorted(_records('voc_segmentation', 'validation', data_dir)) == [NAMES[3], NAMES[4]]
  # (SBD train {2,3,5} + SBD val {6} + VOC train {1,2}) - VOC val {3,4} = {1,2,5,6}.
  assert sorted(_records('voc_segmentation/aug', 'train_aug', data_dir)) == [
      NAMES[1], NAMES[2], NAMES[5], NAMES[6]]


def test_train_aug_arithmetic():
  assert voc.train_aug_names(['a', 'b'], ['c'], ['b', 'c', 'd'], ['e', 'c']) == ['a', 'b', 'd', 'e']
  # The full downloads: 8,498 + 2,857 SBD, 1,464 / 1,449 VOC -> 10,582. Same shape of
  # overlap in miniature: SBD holds VOC train entirely and 2/3 of VOC val.
  voc_train = [f't{i}' for i in range(30)]
  voc_val = [f'v{i}' for i in range(30)]
  sbd_train = voc_train[:20] + voc_val[:20] + [f's{i}' for i in range(50)]
  sbd_val = voc_train[20:] + [f'u{i}' for i in range(15)]
  assert len(voc.train_aug_names(voc_train, voc_val, sbd_train, sbd_val)) == 30 + 50 + 15


def test_voc_labels_exact(built):
  _, data_dir = built
  records = {**_records('voc_segmentation', 'train', data_dir),
             **_records('voc_segmentation', 'validation', data_dir)}
  for i, classes in VOC_CLASSES.items():
    r = records[NAMES[i]]
    semantic, instances = label_maps(i, classes, void=True)
    assert r['image'].shape == (H, W, 3) and r['image'].dtype == np.uint8
    np.testing.assert_array_equal(r['segmentation'][..., 0], semantic)
    assert (r['segmentation'] == 255).sum() == (semantic == 255).sum() > 0
    assert int(r['image_id']) == 2007000000 + i
    assert [int(l) + 1 for l in r['objects']['label']] == list(classes)
    for k, (mask, bbox) in enumerate(zip(r['objects']['mask'], r['objects']['bbox']), start=1):
      np.testing.assert_array_equal(mask[..., 0], (instances == k).astype(np.uint8))
      rows, cols = np.nonzero(instances == k)
      np.testing.assert_allclose(bbox, [rows.min() / H, cols.min() / W, (rows.max() + 1) / H,
                                        (cols.max() + 1) / W], atol=1e-6)


def test_train_aug_prefers_voc_labels_and_reads_sbd(built):
  _, data_dir = built
  records = _records('voc_segmentation/aug', 'train_aug', data_dir)
  # Image 2 is in VOC train: VOC's labels (with the void rim), not SBD's.
  voc_semantic, _ = label_maps(2, VOC_CLASSES[2], void=True)
  np.testing.assert_array_equal(records[NAMES[2]]['segmentation'][..., 0], voc_semantic)
  for i in (5, 6):  # SBD only: classes from GTcls, instances from GTinst, no 255.
    semantic, instances = label_maps(i, SBD_CLASSES[i], void=False)
    r = records[NAMES[i]]
    np.testing.assert_array_equal(r['segmentation'][..., 0], semantic)
    assert not (r['segmentation'] == 255).any()
    assert [int(l) + 1 for l in r['objects']['label']] == list(SBD_CLASSES[i])
    for k, mask in enumerate(r['objects']['mask'], start=1):
      np.testing.assert_array_equal(mask[..., 0], (instances == k).astype(np.uint8))


def test_feeds_both_pipelines(built):
  _, data_dir = built
  config = pipeline.default_dataset_config()
  config.name, config.data_dir, config.eval_split = 'voc_segmentation', data_dir, 'validation'
  config.num_classes, config.eval_pad_size = 21, (H, W + 16)
  batch = next(iter(pipeline.create_eval_loader(config, global_batch_size=2, process_index=0,
                                                process_count=1)))
  by_id = {int(r['image_id']): r for r in _records('voc_segmentation', 'validation',
                                                   data_dir).values()}
  expected = sorted(np.unique(r['segmentation']).tolist() for r in by_id.values())
  got = sorted(np.unique(label[valid]).tolist() for label, valid in zip(batch['label'],
                                                                        batch['valid']))
  assert got == expected  # class ids and 255 reach the semantic batch unchanged
  assert (batch['label'][:, :, W:] == 255).all() and not batch['valid'][:, :, W:].any()
  source = sources.load_data_source('voc_segmentation', 'train', data_dir)
  out = instance_pipeline.DecodeInstances().map(source[0])
  assert out['masks'].shape == (2, H, W) and out['boxes'].shape == (2, 4)
  assert set(out['labels'].tolist()) <= set(range(1, 21))
  assert sources.get_metadata('voc_segmentation').num_classes == 21


def test_unbuilt_dataset_names_the_build_command(tmp_path):
  with pytest.raises(FileNotFoundError, match='segjax.data.build --dataset=voc_segmentation'):
    sources.load_data_source('voc_segmentation', 'train', str(tmp_path))


def test_missing_folder_names_it(tmp_path):
  devkit = write_voc(str(tmp_path / 'files'), with_sbd=False)
  os.rename(os.path.join(devkit, 'VOC2012', 'SegmentationObject'), str(tmp_path / 'moved'))
  with pytest.raises(manual_files.ManualFilesError, match='SegmentationObject'):
    build.build_dataset('voc_segmentation', devkit, str(tmp_path / 'tfds'))
  os.rename(str(tmp_path / 'moved'), os.path.join(devkit, 'VOC2012', 'SegmentationObject'))
  with pytest.raises(manual_files.ManualFilesError, match='benchmark_RELEASE'):
    build.build_dataset('voc_segmentation/aug', str(tmp_path / 'files'), str(tmp_path / 'tfds'))


def _break(devkit, what):
  voc_root = os.path.join(devkit, 'VOC2012')
  cls_png = os.path.join(voc_root, 'SegmentationClass', NAMES[2] + '.png')
  if what == 'size':
    semantic, _ = label_maps(2, VOC_CLASSES[2], void=True)
    _save_palette_png(semantic[:, :40], cls_png)
  elif what == 'palette':
    semantic, _ = label_maps(2, VOC_CLASSES[2], void=True)
    semantic[0, 0] = 21
    _save_palette_png(semantic, cls_png)
  elif what == 'rgb':
    Image.open(cls_png).convert('RGB').save(cls_png)
  else:
    with open(os.path.join(voc_root, 'JPEGImages', NAMES[2] + '.jpg'), 'wb') as f:
      f.write(b'\xff\xd8 this is not a jpeg')
  return cls_png


@pytest.mark.parametrize('what,match', [
    ('size', r'SegmentationClass/2007_000002.png: label size 32x40 .* differs from its image'),
    ('palette', r'SegmentationClass/2007_000002.png: unknown palette index \(class\) \[21\]; '
                r'expected values in 0-20, 255'),
    ('rgb', r'SegmentationClass/2007_000002.png: the class PNG has PIL mode .RGB.'),
    ('corrupt', r'JPEGImages/2007_000002.jpg: cannot read it as an image'),
])
def test_bad_example_raises_naming_the_file(tmp_path, what, match):
  devkit = write_voc(str(tmp_path / 'files'), with_sbd=False)
  _break(devkit, what)
  with pytest.raises(manual_files.BadExampleError, match=match):
    build.build_dataset('voc_segmentation', devkit, str(tmp_path / 'tfds'), num_threads=1)


def test_skip_bad_examples_counts_and_records_them(tmp_path):
  devkit = write_voc(str(tmp_path / 'files'), with_sbd=False)
  _break(devkit, 'palette')
  builder = build.build_dataset('voc_segmentation', devkit, str(tmp_path / 'tfds'),
                                skip_bad_examples=True)
  assert builder.info.splits['train'].num_examples == 1
  assert builder.info.splits['validation'].num_examples == 2
  reopened = sources.get_builder('voc_segmentation', str(tmp_path / 'tfds'))
  skipped = reopened.info.metadata['skipped']
  assert list(skipped) == ['train'] and len(skipped['train']) == 1
  assert 'unknown palette index' in skipped['train'][0]
  assert sorted(_records('voc_segmentation', 'train', str(tmp_path / 'tfds'))) == [NAMES[1]]
