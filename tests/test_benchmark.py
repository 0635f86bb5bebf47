"""The benchmark harness (segjax.benchmark) on tiny models: it runs, the jitted step
compiles once, ratios come from the same run's pairs, torchvision equivalence checks."""

import importlib.util
import os
import statistics

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from segjax import benchmark
from segjax.benchmarks import measure, segjax_workloads, torchvision_workloads
from segjax.models import build_model

_CONFIG_DIR = os.path.join(os.path.dirname(__file__), '..', 'configs')


def _get_config(name, preset=None):
  path = os.path.join(_CONFIG_DIR, name + '.py')
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(preset)


def tiny_fcn_config():
  config = _get_config('fcn8s')
  config.model.width_multiplier = 0.125
  return config


@pytest.fixture(scope='module')
def tiny_infer():
  config = segjax_workloads.prepare_config(tiny_fcn_config(), 1, (32, 32))
  batch = segjax_workloads.make_batch(config, 1, (32, 32))
  return segjax_workloads.workload(config, 'infer', batch)


def test_train_step_compiles_once_and_reports_flops(tiny_infer):
  report = benchmark.run_model(tiny_fcn_config(), mode='train', batch_size=1,
                               image_size=(32, 32), steps=5, matmul_peak=False,
                               log=lambda *_, **__: None)
  side = report['segjax']
  # Warm-up compiled the step; the 5 timed steps (state donated and fed back) did not.
  assert side['jit_cache_size'] == 1
  assert report['compiles_during_timing'] == 0
  assert report['compiles_after_warmup'] == 0
  assert side['compile_s'] > 0
  assert len(report['segjax_times_s']) == 5
  assert side['min_s'] <= side['median_s'] <= side['max_s']
  assert side['median_s'] == statistics.median(report['segjax_times_s'])
  assert side['images_per_s'] == pytest.approx(1 / side['median_s'])
  # XLA's cost analysis: forward + backward >= 2x the forward (conv input and filter
  # gradients); on this tiny model the loss and the optimizer add a few more.
  assert 2 < side['flops_per_step'] / tiny_infer.flops_per_step < 8


def test_same_state_makes_every_train_step_the_same_computation():
  """With same_state each train step starts from the initial state (restored by
  before_step, untimed): the same loss every step; without it the state moves on."""
  config = segjax_workloads.prepare_config(tiny_fcn_config(), 1, (32, 32))
  config.optimizer.learning_rate = 0.1
  batch = segjax_workloads.make_batch(config, 1, (32, 32))
  losses = {}
  for same_state in (False, True):
    workload = segjax_workloads.workload(config, 'train', batch, same_state=same_state)
    assert (workload.before_step is not None) == same_state
    losses[same_state] = []
    for _ in range(3):
      measure.time_step(workload)  # calls before_step first
      losses[same_state].append(float(workload.step()['loss']))
  first, *rest = losses[True]
  assert all(loss == first for loss in rest)
  assert len(set(losses[False])) == 3
  with pytest.raises(ValueError, match='same_state=True is for train steps'):
    benchmark.run_model(tiny_fcn_config(), mode='infer', same_state=True)


def test_torchvision_same_state_restores_model_optimizer_and_rng():
  pytest.importorskip('torchvision')
  config = segjax_workloads.prepare_config(_get_config('fcn_resnet50', 'voc'), 1, (32, 32))
  batch = segjax_workloads.make_batch(config, 1, (32, 32))
  losses = {}
  for same_state in (False, True):
    workload = torchvision_workloads.workload(config, 'train', batch, count_flops=False,
                                              same_state=same_state)
    losses[same_state] = []
    for _ in range(3):
      if workload.before_step is not None:
        workload.before_step()
      losses[same_state].append(workload.step())
  assert losses[True][0] == losses[True][1] == losses[True][2]
  assert len(set(losses[False])) == 3


def test_compile_count_is_the_workloads_own():
  # Two inference workloads of different shapes in one process (as another test file or
  # a user's code jitting steps.predict): each counts only its own compilation.
  config = segjax_workloads.prepare_config(tiny_fcn_config(), 1, (24, 24))
  counts = []
  for size in (24, 40):
    workload = segjax_workloads.workload(config, 'infer',
                                         segjax_workloads.make_batch(config, 1, (size, size)))
    workload.step()
    workload.step()
    counts.append(workload.cache_size())
  assert counts == [1, 1]


def test_ratios_are_pairwise_from_the_same_run(tiny_infer):
  ours = tiny_infer
  calls = []

  def reference_step():
    calls.append(len(calls))
    ours.step()  # some real work, twice per step
    ours.step()

  theirs = measure.Workload(name='reference', step=reference_step, images_per_step=1)
  report = benchmark.compare(ours, theirs, steps=5, warmup=1, matmul_peak=False,
                             log=lambda *_, **__: None)
  assert len(calls) == 1 + 5
  ratios = [b / a for a, b in zip(report['segjax_times_s'], report['reference_times_s'])]
  np.testing.assert_allclose(report['pair_ratios'], ratios)
  assert report['ratio_median'] == statistics.median(ratios)
  assert report['ratio_min'] == min(ratios) and report['ratio_max'] == max(ratios)
  assert report['reference']['median_s'] == statistics.median(report['reference_times_s'])
  assert report['compiles_during_timing'] == 0
  assert ours.cache_size() == 1


def test_torchvision_equivalence_names_the_differences():
  config = _get_config('deeplab_v3', 'voc')  # ResNet-101 at output stride 16
  with pytest.raises(ValueError, match=r'backbone=.resnet101.*output_stride=16.*'
                                       r'--config.model.backbone=.resnet50.'):
    torchvision_workloads.equivalent(config)
  config.model.backbone, config.model.output_stride = 'resnet50', 8
  assert torchvision_workloads.equivalent(config) == 'deeplabv3_resnet50'
  config.model.stem_stride = 2  # no max pool: not torchvision's stem
  with pytest.raises(ValueError, match=r'stem_stride=2 .*--config.model.stem_stride=4'):
    torchvision_workloads.equivalent(config)
  detector = _get_config('mask_rcnn_r50_fpn', 'coco')  # frozen BN: not torchvision's from-scratch
  with pytest.raises(ValueError, match='freeze_bn'):
    torchvision_workloads.equivalent(detector)
  fcn = tiny_fcn_config()  # FCN-8s on a 1/8-width ResNet-18
  with pytest.raises(ValueError, match=r"backbone='resnet18'.*width_multiplier=0.125.*"
                                       r"--config.model.backbone='vgg16'"):
    torchvision_workloads.equivalent(fcn)
  assert torchvision_workloads.equivalent(_get_config('fcn8s', 'voc')) == 'vgg16'
  with pytest.raises(ValueError, match='no torchvision equivalent'):
    torchvision_workloads.equivalent(_get_config('deeplab_v1', 'voc'))


def _fcn_vgg16_variables(module, skips):
  """segjax FCN variables holding the weights of torchvision_workloads.fcn_vgg16's `module`:
  the VGG-16 part through the project's converter (`segjax.convert`), the head by hand."""
  from segjax.convert import from_torchvision
  sd = {k: v.detach().numpy() for k, v in module.state_dict().items()}
  vgg_sd = {k: sd.pop(k) for k in list(sd) if k.startswith('features.')}
  for fc, index in (('fc6', 0), ('fc7', 3)):  # back to torchvision's Linear layout
    weight = sd.pop(f'{fc}.weight')
    vgg_sd[f'classifier.{index}.weight'] = weight.reshape(weight.shape[0], -1)
    vgg_sd[f'classifier.{index}.bias'] = sd.pop(f'{fc}.bias')
  converted, report = from_torchvision.convert_state_dict('vgg16', vgg_sd)
  assert not report.unused, report.unused
  params = dict(converted['params'])
  scores = ['score_fr', 'score_pool4', 'score_pool3'][:skips + 1]
  for name in scores:
    params[name] = {'kernel': sd.pop(f'{name}.weight').transpose(2, 3, 1, 0),
                    'bias': sd.pop(f'{name}.bias')}
  ups = {0: {'upscore': 'upscore'}, 1: {'upscore2': 'upscore2', 'upscore16': 'upscore'},
         2: {'upscore2': 'upscore2', 'upscore_pool4': 'upscore_pool4',
             'upscore8': 'upscore'}}[skips]
  for ours, theirs in ups.items():  # ConvTranspose2d [in, out, kh, kw] -> [kh, kw, in, out]
    params[ours] = {'kernel': sd.pop(f'{theirs}.weight').transpose(2, 3, 0, 1)}
  assert not sd, sorted(sd)  # every torch tensor went somewhere
  return {'params': params}


@pytest.mark.parametrize('name', ['fcn32s', 'fcn16s', 'fcn8s'])
def test_fcn_vgg16_on_torchvision_computes_segjax_fcn(name):
  """The torchvision side of an FCN-VGG row is the same network: same weights, same logits."""
  torch = pytest.importorskip('torch')
  pytest.importorskip('torchvision')
  config = _get_config(name, 'voc')
  config.dataset.num_classes = 5
  skips = torchvision_workloads.FCN_VGG[name]
  module = torchvision_workloads.semantic_model(config).eval()
  with torch.no_grad():  # non-zero scores and a non-bilinear upsampling, so both are tested
    gen = torch.Generator().manual_seed(1)
    for key, tensor in module.state_dict().items():
      if key.startswith(('score', 'upscore')):
        tensor.copy_(0.05 * torch.randn(tensor.shape, generator=gen) + tensor)
  variables = _fcn_vgg16_variables(module, skips)
  model = build_model(config.model, num_classes=5)
  shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 64, 64, 3)),
                                             train=False))
  assert (jax.tree.map(lambda x: x.shape, shapes)
          == jax.tree.map(lambda x: x.shape, variables))  # the same parameters, all filled
  # 72 x 88: pools round up (pool5 is 3 x 3), and the crops are not no-ops.
  image = np.random.default_rng(0).normal(size=(2, 72, 88, 3)).astype(np.float32)
  ours = model.apply(jax.tree.map(jnp.asarray, variables), jnp.asarray(image),
                     train=False)['logits']
  with torch.no_grad():
    theirs = module(torch.from_numpy(image.transpose(0, 3, 1, 2).copy()))['out']
  theirs = theirs.numpy().transpose(0, 2, 3, 1)
  assert ours.shape == theirs.shape == (2, 72, 88, 5)
  error = float(np.max(np.abs(np.asarray(ours) - theirs)) / np.max(np.abs(theirs)))
  assert error < 1e-4, error


def test_torchvision_side_counts_parameters_like_segjax():
  """Same architecture on both sides: parameter counts agree (BN statistics excluded)."""
  torch = pytest.importorskip('torch')
  pytest.importorskip('torchvision')
  config = _get_config('deeplab_v3', 'voc')
  config.model.backbone, config.model.output_stride = 'resnet50', 8
  model = torchvision_workloads.semantic_model(config)
  theirs = sum(p.numel() for p in model.parameters())
  model = build_model(config.model, num_classes=config.dataset.num_classes)
  variables = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0),
                                                jnp.zeros((1, 64, 64, 3)), train=False))
  ours = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(variables['params']))
  assert ours == theirs
  del torch


def test_image_size_flag():
  assert benchmark.parse_size('320,320') == (320, 320)
  assert benchmark.parse_size('512x256') == (512, 256)
  with pytest.raises(ValueError, match='--image_size'):
    benchmark.parse_size('320')


def test_instance_batch_layout():
  config = _get_config('mask_rcnn_r50_fpn')
  batch = segjax_workloads.make_batch(config, 2, (64, 64), num_instances=3)
  assert batch['gt_boxes'].shape == (2, config.dataset.max_instances, 4)
  assert batch['gt_valid'].sum() == 6
  x1, y1, x2, y2 = batch['gt_boxes'][0, 0]
  mask = batch['gt_masks'][0, 0]
  assert mask.sum() == (int(np.ceil(y2)) - int(y1)) * (int(np.ceil(x2)) - int(x1))
  assert (batch['gt_labels'][batch['gt_valid']] >= 1).all()


def test_pipeline_row_divides_its_own_pipeline_and_step_rates(data_dir):
  config = tiny_fcn_config()
  config.dataset.name = 'digit_scenes/tiny'
  config.dataset.data_dir = data_dir
  config.dataset.crop_size = (32, 32)
  config.batch_size = 4
  report = benchmark.run_pipeline(config, steps=5, train_step=True)
  assert report['images_per_batch'] == 4 and report['image_shape'] == [32, 32, 3]
  assert report['images_per_s'] > 0 and report['train_step_images_per_s'] > 0
  # The rate is a throughput over all timed batches, not 1 / the median batch time.
  assert report['images_per_s'] == pytest.approx(4 * 5 / report['total_s'])
  assert report['pipeline_over_train_step'] == pytest.approx(
      report['images_per_s'] / report['train_step_images_per_s'])


def test_memory_side_releases_the_free_heap_before_the_steady_steps():
  config = tiny_fcn_config()
  result = benchmark.memory_side(config, 'segjax', mode='infer', batch_size=1,
                                 image_size=(32, 32), steps=2, num_instances=1)
  assert result['rss_after_heap_release_mb'] is not None
  assert result['rss_after_heap_release_mb'] <= result['rss_after_warmup_mb'] + 5
  assert result['peak_minus_import_mb'] >= result['rss_after_heap_release_mb'] - 5


def test_train_step_comparison_is_only_for_the_pipeline():
  import subprocess
  import sys
  proc = subprocess.run([sys.executable, '-m', 'segjax.benchmark', '--workload=roi_align',
                         '--compare=train_step'], capture_output=True, text=True, timeout=300)
  assert proc.returncode != 0
  assert "--compare=train_step with --workload=roi_align" in proc.stderr
