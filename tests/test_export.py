"""`python -m segjax.export` round trip: a tiny FCN-8s trained by `segjax.main`, exported
with a symbolic batch, loaded without segjax's model code, gives the in-process logits;
and a tiny Mask R-CNN exports and gives the in-process detections."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from segjax import detection_config, export
from segjax.base_config import fcn_config
from segjax.train import checkpoints, detection_trainer, steps, trainer

_STEPS = 4
# The tiny FCN-8s of tests/test_main.py; every field both segjax.main and export get.
# One test scale: the preset's three (eval.tta) export probabilities, not logits.
_TINY = {'dataset.name': 'digit_scenes/tiny', 'model.backbone': 'resnet18',
         'model.width_multiplier': 0.125, 'dataset.crop_size': (32, 32),
         'eval.tta.scales': (1.0,)}
_SIZE = 64  # the exported input: dataset.eval_pad_size
_CONFIG = os.path.join(os.path.dirname(__file__), '..', 'configs', 'fcn8s.py')


def _flags(data_dir):
  return [f'--config={_CONFIG}', *(f'--config.{k}={v}' for k, v in _TINY.items()),
          f'--config.dataset.data_dir={data_dir}']


def _run(args):
  result = subprocess.run([sys.executable, '-m', *args], capture_output=True, text=True,
                          timeout=600, check=False)
  assert result.returncode == 0, result.stderr[-4000:]
  return result


def _tiny_config():
  config = fcn_config('fcn8s', None)
  for field, value in _TINY.items():
    *sections, name = field.split('.')
    node = config
    for section in sections:
      node = node[section]
    node[name] = value
  return config


@pytest.fixture(scope='module')
def exported_run(tmp_path_factory, data_dir):
  """(workdir, model.bin path, export's stderr) of a 4-step tiny FCN-8s run."""
  root = tmp_path_factory.mktemp('export')
  workdir = root / 'run'
  _run(['segjax.main', *_flags(data_dir), f'--workdir={workdir}', '--config.batch_size=4',
        '--config.eval_batch_size=4', f'--config.num_train_steps={_STEPS}',
        f'--config.checkpoint_every_steps={_STEPS}', f'--config.eval_every_steps={_STEPS}',
        '--config.optimizer.warmup_steps=1'])
  output = root / 'model.bin'
  result = _run(['segjax.export', *_flags(data_dir), f'--workdir={workdir}',
                 f'--output={output}'])
  return str(workdir), str(output), result.stderr


def _images(batch, seed=0):
  return np.random.RandomState(seed).uniform(0, 255, (batch, _SIZE, _SIZE, 3)).astype(np.float32)


def test_export_writes_header_and_symbolic_batch(exported_run):
  _, path, stderr = exported_run
  header, exported, weights = export.load_parts(path)
  assert header['task'] == 'semantic' and header['model'] == 'fcn8s'
  assert header['step'] == _STEPS
  assert header['inputs'] == [{'name': 'images', 'shape': ['b', _SIZE, _SIZE, 3],
                               'dtype': 'float32'}]
  assert header['outputs'] == {
      'labels': {'shape': ['b', _SIZE, _SIZE], 'dtype': 'int32'},
      'logits': {'shape': ['b', _SIZE, _SIZE, 11], 'dtype': 'float32'}}
  assert header['class_names'][0] == 'background' and len(header['class_names']) == 11
  assert header['mean'] == [127.7, 126.9, 128.2]
  assert len(weights) == len(header['weights']) == len(exported.in_avals) - 1
  assert 'params/backbone/conv1/kernel' in header['weights']
  # The file is the weights plus a small program: no weight is baked in as a constant.
  weight_bytes = sum(w.nbytes for w in weights)
  assert weight_bytes < os.path.getsize(path) < weight_bytes + 200_000
  assert f'to {path}' in stderr


def test_exported_equals_in_process_for_any_batch_size(exported_run):
  workdir, path, _ = exported_run
  config = _tiny_config()
  template = trainer.create_state(config)
  state, _ = checkpoints.Checkpointer(os.path.join(workdir, 'checkpoints')).restore(template)
  assert int(state.step) == _STEPS
  model = export.load(path)
  mean, std = np.float32(config.dataset.mean), np.float32(config.dataset.std)
  for batch in (1, 3):
    images = _images(batch, seed=batch)
    expected = np.asarray(steps.predict(state, (images - mean) / std))
    out = model(images)
    assert out['logits'].shape == (batch, _SIZE, _SIZE, 11)
    # Not bit-identical: XLA fuses the normalisation into the exported program (measured
    # max abs difference 1.1e-5 on logits up to 16 in magnitude, batch 8).
    np.testing.assert_allclose(np.asarray(out['logits']), expected, rtol=1e-5, atol=1e-4)
    top2 = np.sort(expected, axis=-1)[..., -2:]
    clear = top2[..., 1] - top2[..., 0] > 1e-3   # pixels whose argmax no rounding can flip
    assert clear.mean() > 0.99
    np.testing.assert_array_equal(np.asarray(out['labels'])[clear], expected.argmax(-1)[clear])
  # The trained model's logits depend on the image (a constant output would also "match").
  logits = np.asarray(model(_images(2))['logits'])
  assert np.abs(logits[0] - logits[1]).max() > 1e-3


def test_load_needs_no_segjax_model_code(exported_run):
  _, path, _ = exported_run
  code = (
      'import sys, numpy as np\n'
      'from segjax.export import load\n'
      f'out = load({path!r})(np.zeros((2, {_SIZE}, {_SIZE}, 3), np.float32))\n'
      'loaded = sorted(m for m in sys.modules if m.startswith(("flax", "segjax.models", '
      '"segjax.train", "optax", "orbax")))\n'
      'print(list(out["labels"].shape), loaded)\n')
  result = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True,
                          timeout=300, check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  assert result.stdout.strip() == f'[2, {_SIZE}, {_SIZE}] []'


def test_load_with_other_weights_and_errors(exported_run, tmp_path):
  _, path, _ = exported_run
  header, _, weights = export.load_parts(path)
  zeros = [np.zeros_like(w) for w in weights]
  logits = np.asarray(export.load(path, weights=zeros)(_images(1))['logits'])
  # All-zero weights: every layer outputs its (zero) bias, so the logits are exactly 0.
  np.testing.assert_array_equal(logits, 0.0)
  bad = tmp_path / 'bad.bin'
  bad.write_bytes(b'not an export')
  with pytest.raises(ValueError, match='is not a segjax export'):
    export.load(str(bad))
  with pytest.raises(TypeError, match=r"expected inputs \['images'\]"):
    export.load(path)(_images(1), _images(1))
  assert json.loads(json.dumps(header)) == header


def test_export_cli_names_a_missing_checkpoint(tmp_path, data_dir):
  result = subprocess.run([sys.executable, '-m', 'segjax.export', *_flags(data_dir),
                           f'--workdir={tmp_path}', f'--output={tmp_path / "m.bin"}'],
                          capture_output=True, text=True, timeout=300, check=False)
  assert result.returncode != 0
  assert 'has no checkpoints/ directory' in result.stderr
  assert 'Traceback' not in result.stderr


# Tiny Mask R-CNN (tests/test_detection_trainer.py's), all detections kept (score 0).
_TINY_DETECTOR = {
    'width_multiplier': 0.125, 'fpn_channels': 16, 'representation_size': 32,
    'mask_head_channels': 8, 'rpn_pre_nms_top_n_test': 50, 'rpn_post_nms_top_n_test': 20,
    'box_detections_per_img': 8, 'box_score_thresh': 0.0}


def test_mask_rcnn_exports_with_symbolic_batch_and_matches(tmp_path):
  config = detection_config.detection_config('mask_rcnn', None)
  for name, value in _TINY_DETECTOR.items():
    config.model[name] = value
  state = detection_trainer.create_state(config)
  header, serialized, weights = export.export_model(
      config, {'params': state.params, 'batch_stats': state.batch_stats})
  path = str(tmp_path / 'mask_rcnn.bin')
  export.save(path, header, serialized, weights)
  model = export.load(path)
  assert header['inputs'][1] == {'name': 'image_sizes', 'shape': ['b', 2], 'dtype': 'int32'}
  assert header['outputs']['mask_probs']['shape'] == ['b', 8, 28, 28]

  images = np.random.RandomState(0).uniform(0, 255, (2, 64, 64, 3)).astype(np.float32)
  sizes = np.asarray([[64, 64], [48, 40]], np.int32)
  mean, std = np.float32(config.dataset.mean), np.float32(config.dataset.std)
  normalised = (images - mean) / std
  normalised[1, 48:] = 0.0   # the pipeline pads with the mean: 0 after normalising
  normalised[1, :, 40:] = 0.0
  expected = detection_trainer.predict(state, {'image': normalised, 'image_size': sizes})
  out = model(images, sizes)
  assert set(out) == {'boxes', 'scores', 'labels', 'valid', 'mask_probs'}
  assert np.asarray(expected['valid']).sum() > 0
  for key in out:
    np.testing.assert_allclose(np.asarray(out[key]), np.asarray(expected[key]), rtol=1e-5,
                               atol=1e-4, err_msg=key)
  # The second image's boxes stay inside its 40 x 48 (w x h) size.
  boxes = np.asarray(out['boxes'])[1][np.asarray(out['valid'])[1]]
  assert boxes[:, 2].max() <= 40 and boxes[:, 3].max() <= 48
  # Batch 1 gives the first image's detections.
  single = model(images[:1], sizes[:1])
  np.testing.assert_allclose(np.asarray(single['boxes'])[0], np.asarray(out['boxes'])[0],
                             atol=1e-4)


def test_tta_config_exports_mean_probabilities(tmp_path):
  config = _tiny_config()
  config.eval.tta.flip = True
  config.eval.tta.scales = (1.0, 0.5)
  state = trainer.create_state(config)
  path = str(tmp_path / 'tta.bin')
  export.save(path, *export.export_model(
      config, {'params': state.params, 'batch_stats': state.batch_stats}, image_size=(32, 32)))
  model = export.load(path)
  assert model.header['inputs'][0]['shape'] == ['b', 32, 32, 3]
  images = np.random.RandomState(1).uniform(0, 255, (2, 32, 32, 3)).astype(np.float32)
  mean, std = np.float32(config.dataset.mean), np.float32(config.dataset.std)
  expected = np.asarray(steps.predict_probs(state, (images - mean) / std, scales=(1.0, 0.5),
                                            flip=True))
  out = model(images)
  assert set(out) == {'probs', 'labels'}
  np.testing.assert_allclose(np.asarray(out['probs']), expected, rtol=0, atol=1e-6)
  np.testing.assert_allclose(np.asarray(out['probs']).sum(-1), 1.0, atol=1e-5)
