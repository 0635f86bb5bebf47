"""Every config in configs/ builds with every preset, and bad values fail early and clearly."""

import glob
import importlib.util
import os

import pytest

from segjax import config_validation

_CONFIG_DIR = os.path.join(os.path.dirname(__file__), '..', 'configs')
_CONFIG_FILES = sorted(glob.glob(os.path.join(_CONFIG_DIR, '*.py')))
# Each real-data preset names a segjax builder, its splits and its class count.
_REAL_DATA = {
    'voc': ('voc_segmentation/aug', 'train_aug', 'validation', 21),
    'cityscapes': ('cityscapes_semantic', 'train', 'validation', 19),
    'coco': ('coco_instances', 'train', 'validation', 81),
}


def _load(path):
  spec = importlib.util.spec_from_file_location(os.path.basename(path)[:-3], path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _all_presets():
  for path in _CONFIG_FILES:
    module = _load(path)
    for preset in module.PRESETS:
      yield pytest.param(path, preset, id=f'{os.path.basename(path)}:{preset}')


def test_there_are_configs():
  assert {'fcn8s.py', 'fcn16s.py', 'fcn32s.py', 'deeplab_v1.py', 'deeplab_v1_largefov.py',
          'deeplab_v1_msc_largefov.py', 'deeplab_v2_aspp_s.py', 'deeplab_v2_aspp_l.py',
          'deeplab_v2_largefov.py', 'deeplab_v2_7x7.py',
          'deeplab_v3.py', 'deeplab_v3plus.py'} <= {os.path.basename(p) for p in _CONFIG_FILES}


@pytest.mark.parametrize('path,preset', list(_all_presets()))
def test_every_config_and_preset_builds_and_validates(path, preset):
  config = _load(path).get_config(preset)
  assert config.model.name in os.path.basename(path)
  if config.dataset.name.startswith('digit_scenes'):
    assert not config.dataset.hflip  # a mirrored 2 is not a 2
    assert 'eval' not in config or 'tta' not in config.eval or not config.eval.tta.flip
  if preset in _REAL_DATA:
    d = config.dataset
    assert (d.name, d.train_split, d.eval_split, d.num_classes) == _REAL_DATA[preset]
  config_validation.validate_config(config)


def test_default_preset_is_the_first_and_unknown_preset_lists_choices():
  module = _load(os.path.join(_CONFIG_DIR, 'fcn8s.py'))
  assert module.get_config().dataset.name == 'digit_scenes'
  with pytest.raises(ValueError, match="'digit_scenes', 'voc', 'cityscapes'"):
    module.get_config('kitti')


@pytest.mark.parametrize('field,value,match', [
    ('model.name', 'fcn4s', 'fcn8s'),
    ('model.backbone', 'vgg15', 'vgg16'),
    ('model.upsampling', 'nearest', 'bilinear'),
    ('model.output_stride', 4, '8'),
    ('dataset.name', 'no_such_dataset', 'digit_scenes'),
    ('parallel', 'pjit', "'pmap', 'jit'"),
    ('optimizer.name', 'lamb', "'sgd', 'adamw'"),
    ('batch_size', 0, 'batch_size'),
    ('dataset.crop_size', (64,), 'crop_size'),
])
def test_bad_values_raise_naming_value_and_choices(field, value, match):
  config = _load(os.path.join(_CONFIG_DIR, 'fcn8s.py')).get_config()
  section, _, name = field.rpartition('.')
  target = config[section] if section else config
  target[name] = value
  with pytest.raises(ValueError, match=match) as error:
    config_validation.validate_config(config)
  assert repr(value) in str(error.value) or str(value) in str(error.value)
