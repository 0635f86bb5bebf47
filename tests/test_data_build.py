"""`python -m segjax.data.build`: one command per dataset, clear one-line errors, no TensorFlow."""

import os
import subprocess
import sys

import test_data_voc

_ROOT = os.path.join(os.path.dirname(__file__), '..')


def _run(*args):
  return subprocess.run([sys.executable, *args], cwd=_ROOT, capture_output=True, text=True,
                        timeout=300)


def test_build_command_writes_splits_without_tensorflow(tmp_path):
  devkit = test_data_voc.write_voc(str(tmp_path / 'files'))
  data_dir = str(tmp_path / 'tfds')
  done = _run('-m', 'segjax.data.build', '--dataset=voc_segmentation/aug',
              f'--manual_dir={devkit}', f'--data_dir={data_dir}')
  assert done.returncode == 0, done.stderr[-2000:]
  assert 'voc_segmentation/aug train: 2 examples' in done.stdout
  assert 'voc_segmentation/aug train_aug: 4 examples' in done.stdout
  assert 'voc_segmentation/aug validation: 2 examples' in done.stdout
  assert os.path.isdir(os.path.join(data_dir, 'voc_segmentation', 'aug', '1.0.0'))
  # Reading it back in a fresh process imports no TensorFlow.
  check = _run('-c', 'import sys; from segjax.data import sources; '
               f's = sources.load_data_source("voc_segmentation/aug", "train_aug", {data_dir!r}); '
               'r = s[0]; print(len(s), r["image"].shape[-1], "tensorflow" in sys.modules)')
  assert check.returncode == 0, check.stderr[-2000:]
  assert check.stdout.split() == ['4', '3', 'False']


def test_layout_errors_are_one_line_naming_the_path(tmp_path):
  missing = str(tmp_path / 'nowhere')
  done = _run('-m', 'segjax.data.build', '--dataset=coco_instances', f'--manual_dir={missing}',
              f'--data_dir={tmp_path / "tfds"}')
  assert done.returncode == 1
  assert done.stderr.strip().splitlines()[-1] == (
      f'error: Expected the downloaded files of coco_instances (--manual_dir) at {missing}: '
      'no such directory.')
  os.makedirs(tmp_path / 'coco' / 'annotations')
  done = _run('-m', 'segjax.data.build', '--dataset=coco_instances',
              f'--manual_dir={tmp_path / "coco"}', f'--data_dir={tmp_path / "tfds"}')
  assert done.returncode == 1
  last = done.stderr.strip().splitlines()[-1]
  assert last.startswith('error: Expected the COCO train2017 annotations at ')
  assert last.endswith('annotations/instances_train2017.json: no such file.')
  done = _run('-m', 'segjax.data.build', '--dataset=digit_scenes', f'--manual_dir={tmp_path}')
  assert done.returncode == 1
  assert "valid: ['voc_segmentation', 'coco_instances', 'cityscapes_semantic']" in done.stderr
