"""Every DeepLab config trains a few steps and evaluates (tiny widths, 'digit_scenes/tiny').

Calls `trainer.train_and_evaluate` directly, as `python -m segjax.main` does, with the
config's own model, loss and eval settings and only the sizes shrunk.
"""

import glob
import importlib.util
import os

import jax
import numpy as np
import pytest

from segjax.train import checkpoints, metric_writer, trainer

_CONFIG_DIR = os.path.join(os.path.dirname(__file__), '..', 'configs')
_DEEPLAB_CONFIGS = sorted(glob.glob(os.path.join(_CONFIG_DIR, 'deeplab_*.py')))
pytestmark = pytest.mark.slow


def _load(path):
  spec = importlib.util.spec_from_file_location(os.path.basename(path)[:-3], path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _tiny(config, data_dir):
  config.dataset.name = 'digit_scenes/tiny'
  config.dataset.data_dir = data_dir
  config.dataset.crop_size = (32, 32)
  config.model.width_multiplier = 1 / 16
  config.batch_size = 4
  config.eval_batch_size = 10
  config.num_train_steps = 2
  config.eval_every_steps = 2
  config.checkpoint_every_steps = 2
  config.log_every_steps = 1
  config.optimizer.warmup_steps = 1
  return config


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp('tfds'))


def test_there_is_a_run_per_deeplab_config():
  assert len(_DEEPLAB_CONFIGS) == 9


@pytest.mark.parametrize('path', _DEEPLAB_CONFIGS, ids=os.path.basename)
def test_config_trains_and_evaluates(path, data_dir, tmp_path):
  config = _tiny(_load(path).get_config(), data_dir)
  if 'aspp_s' in path:  # one run also evaluates with multi-scale TTA and the CRF
    config.eval.tta.scales = (0.75, 1.0)
    config.eval.crf.enabled = True
    config.eval.crf.num_iterations = 2
  metrics = trainer.train_and_evaluate(config, str(tmp_path))
  train = metric_writer.read_metrics(str(tmp_path), 'train')
  evals = metric_writer.read_metrics(str(tmp_path), 'eval')
  assert [r['step'] for r in train] == [1, 2] and [r['step'] for r in evals] == [2]
  assert all(np.isfinite(r['loss']) and r['loss'] > 0 for r in train)
  assert 0.0 <= metrics['miou'] <= 1.0 and 0.0 < metrics['pixel_accuracy'] <= 1.0
  assert metrics['miou'] == pytest.approx(evals[-1]['miou'])
  # The two steps moved the parameters away from their initial values.
  initial = trainer.create_state(config)
  final, _ = checkpoints.Checkpointer(os.path.join(tmp_path, 'checkpoints')).restore(initial)
  assert int(final.step) == 2
  moved = [not np.array_equal(a, b) for a, b in zip(jax.tree_util.tree_leaves(final.params),
                                                     jax.tree_util.tree_leaves(initial.params))]
  assert np.mean(moved) > 0.5
