"""`python -m segjax.predict`: label / overlay PNGs of semantic models, COCO results of
instance models, on images of odd sizes and modes, from checkpoints written by the real
Checkpointer; clear errors for bad inputs."""

import importlib.util
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from segjax import predict, visualize
from segjax.train import checkpoints, detection_trainer, trainer
from test_visualize import random_scores

_CONFIGS = os.path.join(os.path.dirname(__file__), '..', 'configs')
NUM_CLASSES = 11  # digit_scenes: background + 10 digits

# Tiny models on digit_scenes/tiny, as CLI overrides and as config fields.
# One test scale: the references below are the plain model's argmax.
_SEMANTIC = {'dataset.name': 'digit_scenes/tiny', 'model.width_multiplier': 0.125,
             'dataset.crop_size': (32, 32), 'eval.tta.scales': (1.0,)}
_INSTANCE = {
    'dataset.name': 'digit_scenes/tiny', 'model.width_multiplier': 0.125,
    'model.fpn_channels': 16, 'model.representation_size': 32, 'model.mask_head_channels': 8,
    'model.rpn_pre_nms_top_n_test': 50, 'model.rpn_post_nms_top_n_test': 20,
    'model.box_detections_per_img': 8,
}


def _config(name, fields, data_dir):
  spec = importlib.util.spec_from_file_location(name, os.path.join(_CONFIGS, f'{name}.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  for field, value in fields.items():
    *sections, key = field.split('.')
    node = config
    for section in sections:
      node = node[section]
    node[key] = value
  config.dataset.data_dir = data_dir
  return config


def _save(state, workdir):
  checkpointer = checkpoints.Checkpointer(os.path.join(workdir, 'checkpoints'))
  checkpointer.save(state, {'unused': True})
  checkpointer.wait()
  checkpointer.close()


def _write_inputs(directory):
  """Odd sizes and modes: RGB 37x53, grayscale 41x70, RGBA 20x20, 16-bit grayscale 33x33."""
  os.makedirs(directory, exist_ok=True)
  rng = np.random.default_rng(0)
  images = {'rgb.png': Image.fromarray(rng.integers(0, 256, (37, 53, 3), dtype=np.uint8)),
            'gray.png': Image.fromarray(rng.integers(0, 256, (41, 70), dtype=np.uint8)),
            'rgba.png': Image.fromarray(rng.integers(0, 256, (20, 20, 4), dtype=np.uint8)),
            'deep.png': Image.fromarray(rng.integers(0, 65536, (33, 33), dtype=np.uint16))}
  for name, image in images.items():
    image.save(os.path.join(directory, name))
  return {name: os.path.join(directory, name) for name in images}


@pytest.fixture(scope='module')
def semantic_run(tmp_path_factory, data_dir):
  """A checkpointed tiny FCN-8s whose score layers are random (varied predictions)."""
  config = _config('fcn8s', _SEMANTIC, data_dir)
  state = random_scores(trainer.create_state(config))
  workdir = str(tmp_path_factory.mktemp('fcn_run'))
  _save(state, workdir)
  return config, state, workdir


def _reference_labels(config, state, rgb):
  """Argmax of the model's logits on `rgb` padded (mean colour) to a multiple of 32 at
  least eval_pad_size, normalised, cropped back: what predict must write."""
  height, width = rgb.shape[:2]
  ph = max(64, -(-height // 32) * 32)
  pw = max(64, -(-width // 32) * 32)
  padded = np.empty((ph, pw, 3), np.float32)
  padded[...] = config.dataset.mean
  padded[:height, :width] = rgb
  x = (padded - np.asarray(config.dataset.mean, np.float32)) / np.asarray(config.dataset.std,
                                                                          np.float32)
  logits = state.apply_fn({'params': state.params, 'batch_stats': state.batch_stats}, x[None],
                          train=False)['logits']
  return np.asarray(jax.numpy.argmax(logits[0], -1))[:height, :width]


def test_semantic_predict_writes_label_equal_to_model_argmax(tmp_path, semantic_run):
  config, state, workdir = semantic_run
  inputs = _write_inputs(str(tmp_path / 'in'))
  out = str(tmp_path / 'out')
  result = predict.predict(config, input_pattern=str(tmp_path / 'in'), output_dir=out,
                           workdir=workdir, batch_size=2, progress=False)
  assert sorted(os.listdir(out)) == sorted(f'{n}_{kind}.png' for n in ('rgb', 'gray', 'rgba', 'deep')
                                           for kind in ('label', 'overlay'))
  classes = set()
  for name, path in inputs.items():
    stem = name[:-4]
    rgb = np.asarray(Image.open(path).convert('RGB'))
    if name == 'deep.png':  # 16-bit: scaled to 8 bits by / 257
      rgb = np.repeat(np.round(np.asarray(Image.open(path)) / 257.0).astype(np.uint8)[..., None],
                      3, axis=-1)
    label_image = Image.open(os.path.join(out, f'{stem}_label.png'))
    overlay = Image.open(os.path.join(out, f'{stem}_overlay.png'))
    assert label_image.mode == 'P' and label_image.size == Image.open(path).size
    assert overlay.mode == 'RGB' and overlay.size == Image.open(path).size
    label = np.asarray(label_image)
    assert 0 <= label.min() and label.max() < NUM_CLASSES
    np.testing.assert_array_equal(label, _reference_labels(config, state, rgb), err_msg=name)
    np.testing.assert_array_equal(np.asarray(overlay),
                                  visualize.overlay(rgb, label, ignore_label=None))
    classes |= set(np.unique(label).tolist())
  assert len(classes) > 2  # the check above compares real, varied predictions
  assert result.label_paths[0] == os.path.join(out, 'deep_label.png')  # sorted input order


@pytest.mark.slow  # a subprocess: imports and compiles again (~45 s on a busy 2-core CPU)
def test_predict_command_line(tmp_path, semantic_run):
  config, state, workdir = semantic_run
  inputs = _write_inputs(str(tmp_path / 'in'))
  out = tmp_path / 'out'
  command = [sys.executable, '-m', 'segjax.predict', f'--config={_CONFIGS}/fcn8s.py',
             *(f'--config.{k}={v}' for k, v in _SEMANTIC.items()),
             f'--config.dataset.data_dir={config.dataset.data_dir}',
             f'--checkpoint={workdir}/checkpoints', f'--input={tmp_path}/in/rgb.p*',
             f'--output={out}']
  run = subprocess.run(command, capture_output=True, text=True, timeout=300, check=False)
  assert run.returncode == 0, run.stderr[-3000:]
  assert '1 image(s)' in run.stdout
  assert sorted(os.listdir(out)) == ['rgb_label.png', 'rgb_overlay.png']
  rgb = np.asarray(Image.open(inputs['rgb.png']))
  np.testing.assert_array_equal(np.asarray(Image.open(out / 'rgb_label.png')),
                                _reference_labels(config, state, rgb))

  bad = subprocess.run(command[:-2] + [f'--input={tmp_path}/nothing*.png', f'--output={out}'],
                       capture_output=True, text=True, timeout=300, check=False)
  assert bad.returncode == 1 and 'nothing*.png' in bad.stderr and 'matches no file' in bad.stderr


def test_bad_inputs_name_the_path(tmp_path, semantic_run):
  config, _, workdir = semantic_run
  with pytest.raises(predict.PredictError, match='no_such_dir/x'):
    predict.predict(config, input_pattern=str(tmp_path / 'no_such_dir/x*.png'),
                    output_dir=str(tmp_path / 'o'), workdir=workdir, progress=False)
  (tmp_path / 'empty').mkdir()
  with pytest.raises(predict.PredictError, match='directory without image files'):
    predict.predict(config, input_pattern=str(tmp_path / 'empty'),
                    output_dir=str(tmp_path / 'o'), workdir=workdir, progress=False)
  broken = tmp_path / 'broken.png'
  broken.write_text('not a png')
  with pytest.raises(predict.PredictError, match='cannot read image .*broken.png'):
    predict.predict(config, input_pattern=str(broken), output_dir=str(tmp_path / 'o'),
                    workdir=workdir, progress=False)
  good = _write_inputs(str(tmp_path / 'in'))['rgb.png']
  (tmp_path / 'fresh_run').mkdir()
  with pytest.raises(predict.PredictError, match='no checkpoint in .*fresh_run'):
    predict.predict(config, input_pattern=good, output_dir=str(tmp_path / 'o'),
                    workdir=str(tmp_path / 'fresh_run'), progress=False)
  with pytest.raises(predict.PredictError, match='exactly one of'):
    predict.predict(config, input_pattern=good, output_dir=str(tmp_path / 'o'), progress=False)


@pytest.mark.slow  # compiles Mask R-CNN init and inference (~60-130 s on 2 cores)
def test_instance_predict_writes_overlays_and_coco_results(tmp_path, data_dir):
  config = _config('mask_rcnn_r50_fpn', _INSTANCE, data_dir)
  state = detection_trainer.create_state(config)
  workdir = str(tmp_path / 'run')
  _save(state, workdir)
  inputs = _write_inputs(str(tmp_path / 'in'))
  out = str(tmp_path / 'out')
  # --checkpoint may name one step's directory.
  result = predict.predict(config, input_pattern=str(tmp_path / 'in/*.png'), output_dir=out,
                           checkpoint=os.path.join(workdir, 'checkpoints', '0'), batch_size=4,
                           score_threshold=0.0, progress=False)
  with open(result.results_path) as f:
    results = json.load(f)
  with open(os.path.join(out, 'images.json')) as f:
    images = {image['id']: image for image in json.load(f)}
  assert sorted(os.path.basename(i['file_name']) for i in images.values()) == sorted(inputs)
  assert results, 'the random detector should still detect something above score_thresh'
  for r in results:
    image = images[r['image_id']]
    height, width = image['height'], image['width']
    assert Image.open(image['file_name']).size == (width, height)
    assert 1 <= r['category_id'] < NUM_CLASSES
    x, y, w, h = r['bbox']
    assert 0 <= x and 0 <= y and w >= 0 and h >= 0
    assert x + w <= width + 1e-3 and y + h <= height + 1e-3
    assert 0.0 <= r['score'] <= 1.0
    rle = dict(r['segmentation'], counts=r['segmentation']['counts'].encode('ascii'))
    mask = mask_utils.decode(rle)
    assert mask.shape == (height, width) and set(np.unique(mask)) <= {0, 1}
  for name, path in inputs.items():
    overlay = Image.open(os.path.join(out, f'{name[:-4]}_overlay.png'))
    assert overlay.mode == 'RGB' and overlay.size == Image.open(path).size
