"""config.init_from: converted weights loaded at initialisation, with a report and clear errors."""

import jax
import numpy as np
import pytest

from segjax import base_config, config_validation
from segjax.convert import checkpoint
from segjax.train import checkpoints, init_from, trainer


def _tree(**shapes):
  """{'params': {...}, 'batch_stats': {...}} from 'collection/a/b' = shape keyword pairs."""
  out = {'params': {}, 'batch_stats': {}}
  for i, (name, shape) in enumerate(sorted(shapes.items())):
    collection, *path = name.split('__')
    node = out[collection]
    for p in path[:-1]:
      node = node.setdefault(p, {})
    node[path[-1]] = np.full(shape, float(i), np.float32)
  return out


MODEL = _tree(params__backbone__conv1__kernel=(3, 3, 3, 8), params__backbone__bn1__scale=(8,),
              batch_stats__backbone__bn1__mean=(8,), params__head__kernel=(1, 1, 8, 4))
LOADED = {
    'params': {'backbone': {'conv1': {'kernel': np.full((3, 3, 3, 8), 7.0, np.float32)},
                            'bn1': {'scale': np.full((8,), 8.0, np.float32)}},
               'head': {'kernel': np.full((1, 1, 8, 21), 9.0, np.float32)}},
    'batch_stats': {'backbone': {'bn1': {'mean': np.full((8,), 6.0, np.float32)}}},
}


def test_subtree_is_loaded_and_the_rest_keeps_its_init():
  merged, report = init_from.merge_variables(MODEL, LOADED, ('backbone',))
  assert float(merged['params']['backbone']['conv1']['kernel'][0, 0, 0, 0]) == 7.0
  assert float(merged['params']['backbone']['bn1']['scale'][0]) == 8.0
  assert float(merged['batch_stats']['backbone']['bn1']['mean'][0]) == 6.0
  np.testing.assert_array_equal(merged['params']['head']['kernel'],
                                MODEL['params']['head']['kernel'])
  assert report.loaded == ['batch_stats/backbone/bn1/mean', 'params/backbone/bn1/scale',
                           'params/backbone/conv1/kernel']
  assert report.initialised == ['params/head/kernel']
  assert report.unused == ['params/head/kernel']
  summary = report.summary('/ckpt')
  assert 'loaded 3 variables' in summary and 'newly initialised 1 (params/head/kernel)' in summary


def test_subtree_can_be_renamed_into_the_model():
  model = {'params': {'backbone': {'body': MODEL['params']['backbone']}},
           'batch_stats': {'backbone': {'body': MODEL['batch_stats']['backbone']}}}
  merged, report = init_from.merge_variables(model, LOADED, ('backbone->backbone/body',))
  assert float(merged['params']['backbone']['body']['conv1']['kernel'].max()) == 7.0
  assert float(merged['batch_stats']['backbone']['body']['bn1']['mean'].max()) == 6.0
  assert report.initialised == []


def test_shape_mismatch_names_the_parameter_and_both_shapes():
  with pytest.raises(ValueError, match=r"shape mismatch for params 'head/kernel': checkpoint "
                                       r'\(1, 1, 8, 21\) vs model \(1, 1, 8, 4\)'):
    init_from.merge_variables(MODEL, LOADED)  # () = everything, the 21-class head too


def test_unknown_subtree_and_unknown_parameter_are_named():
  with pytest.raises(ValueError, match=r"subtree 'classifier' is not in the checkpoint; its "
                                       r"top-level entries are \['backbone', 'head'\]"):
    init_from.merge_variables(MODEL, LOADED, ('classifier',))
  with pytest.raises(ValueError, match=r"checkpoint params 'backbone/conv1/kernel' has no "
                                       r"counterpart 'body/conv1/kernel'"):
    init_from.merge_variables(MODEL, LOADED, ('backbone->body',))


def test_config_errors_name_the_field():
  config = base_config.get_base_config()
  config.init_from.path = '/no/such/dir'
  with pytest.raises(ValueError, match=r"config.init_from.path='/no/such/dir' is not a "
                                       'directory; convert weights first'):
    config_validation.validate_config(config)
  config.init_from.path = ''
  config.init_from.subtrees = ('backbone->',)
  with pytest.raises(ValueError, match=r"subtrees entry 'backbone->' must be a non-empty path"):
    config_validation.validate_config(config)
  with pytest.raises(ValueError, match=r"subtrees='backbone' must be a tuple of paths"):
    init_from.parse_subtrees('backbone')
  with pytest.raises(FileNotFoundError, match="config.init_from.path='/no/such/dir' does not "
                                              'exist'):
    init_from.load(_init_config('/no/such/dir'), MODEL)


def _init_config(path, subtrees=()):
  c = init_from.default_config()
  c.path = path
  c.subtrees = subtrees
  return c


# ---------------------------------------------------------------------------
# Through the trainer, from a converted torchvision ResNet-18.


@pytest.fixture(scope='module')
def resnet18_dir(tmp_path_factory):
  torch = pytest.importorskip('torch')
  torchvision = pytest.importorskip('torchvision')
  from segjax.convert import from_torchvision  # pylint: disable=import-outside-toplevel
  torch.manual_seed(0)
  tv = torchvision.models.resnet18(weights=None)
  with torch.no_grad():
    tv.bn1.running_mean.normal_()
  pth = str(tmp_path_factory.mktemp('tv') / 'resnet18.pth')
  torch.save(tv.state_dict(), pth)
  path, _ = from_torchvision.convert_file('resnet18', pth,
                                          str(tmp_path_factory.mktemp('out') / 'r18'))
  return path, tv


def _fcn_config(path, subtrees=('backbone',), width=1.0):
  config = base_config.fcn_config('fcn8s', 'digit_scenes')
  config.model.width_multiplier = width
  config.init_from.path = path
  config.init_from.subtrees = subtrees
  config_validation.validate_config(config)
  return config


def test_trainer_state_starts_from_the_converted_backbone(resnet18_dir):
  path, tv = resnet18_dir
  loaded, metadata = checkpoint.load_variables(path)
  assert metadata['arch'] == 'resnet18'
  state = trainer.create_state(_fcn_config(path))
  fresh = trainer.create_state(_fcn_config(''))
  np.testing.assert_array_equal(state.params['backbone']['layer2_0']['conv1']['kernel'],
                                tv.layer2[0].conv1.weight.detach().numpy().transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(state.batch_stats['backbone']['bn1']['mean'],
                                tv.bn1.running_mean.numpy())
  jax.tree_util.tree_map(np.testing.assert_array_equal, state.params['backbone'],
                         loaded['params']['backbone'])
  # The FCN score layers keep their fresh init; the optimizer state fits the new params.
  for name in ('score_fr', 'score_pool4', 'score_pool3'):
    jax.tree_util.tree_map(np.testing.assert_array_equal, state.params[name], fresh.params[name])
  assert not np.array_equal(state.params['backbone']['conv1']['kernel'],
                            fresh.params['backbone']['conv1']['kernel'])
  assert (jax.tree_util.tree_structure(state.opt_state)
          == jax.tree_util.tree_structure(fresh.opt_state))


def test_trainer_raises_on_a_backbone_of_another_width(resnet18_dir):
  path, _ = resnet18_dir
  with pytest.raises(ValueError, match=r"shape mismatch for params 'backbone/bn1/bias': "
                                       r'checkpoint \(64,\) vs model \(16,\)'):
    trainer.create_state(_fcn_config(path, width=0.25))


def test_a_resume_replaces_the_init_from_weights(resnet18_dir, tmp_path):
  # The trainer applies init_from in create_state; loop.run then restores the workdir's
  # latest checkpoint over it, so a resumed run continues from its own weights.
  path, _ = resnet18_dir
  own = trainer.create_state(_fcn_config(''))
  manager = checkpoints.Checkpointer(str(tmp_path / 'checkpoints'), async_save=False)
  manager.save(own, {'note': 'data'}, metrics=None)
  manager.wait()
  started = trainer.create_state(_fcn_config(path))
  restored, _ = manager.restore_latest(started)
  manager.close()
  jax.tree_util.tree_map(np.testing.assert_array_equal, restored.params, own.params)
  jax.tree_util.tree_map(np.testing.assert_array_equal, restored.batch_stats, own.batch_stats)


def test_detection_trainer_loads_a_converted_resnet_into_its_body(resnet18_dir):
  from segjax import detection_config  # pylint: disable=import-outside-toplevel
  from segjax.train import detection_trainer  # pylint: disable=import-outside-toplevel
  path, tv = resnet18_dir
  config = detection_config.detection_config('faster_rcnn', 'digit_scenes')
  config.model.width_multiplier = 1.0
  config.init_from.path = path
  config.init_from.subtrees = ('backbone->backbone/body',)
  detection_config.validate_detection_config(config)
  state = detection_trainer.create_state(config)
  body = state.params['backbone']['body']
  np.testing.assert_array_equal(body['layer4_1']['conv2']['kernel'],
                                tv.layer4[1].conv2.weight.detach().numpy().transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(state.batch_stats['backbone']['body']['bn1']['mean'],
                                tv.bn1.running_mean.numpy())
  assert 'fpn' in state.params['backbone'] and 'rpn' in state.params  # fresh init
