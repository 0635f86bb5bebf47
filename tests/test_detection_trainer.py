"""Tests for `segjax.train.detection_trainer`: its pure pieces (lr schedule, frozen-BN
gradients, sampling keys, COCO evaluation of a batch stream), and end-to-end runs of
`python -m segjax.main` with the detection configs on digit_scenes/tiny: train +
COCO eval + checkpoint, rerun of a finished run, and resume from an earlier checkpoint
to bit-identical parameters and metrics."""

import os
import shutil
import subprocess
import sys

import flax
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from segjax import detection_config
from segjax.evaluation import coco_eval
from segjax.train import detection_trainer as dt
from segjax.train import metric_writer

_CONFIGS = os.path.join(os.path.dirname(__file__), '..', 'configs')
NUM_EVAL = 10  # digit_scenes/tiny validation

# The tiny detector of test_mask_rcnn.tiny_config (resnet18 at 1/8 width) on 64x64 scenes.
_TINY = {
    'dataset.name': 'digit_scenes/tiny', 'model.width_multiplier': 0.125,
    'model.fpn_channels': 16, 'model.representation_size': 32, 'model.mask_head_channels': 8,
    'model.rpn_pre_nms_top_n_train': 100, 'model.rpn_post_nms_top_n_train': 40,
    'model.rpn_pre_nms_top_n_test': 50, 'model.rpn_post_nms_top_n_test': 20,
    'model.rpn_batch_size_per_image': 32, 'model.box_batch_size_per_image': 16,
    'model.box_detections_per_img': 8, 'batch_size': 2, 'optimizer.warmup_steps': 1,
    # 4 does not divide the 10 validation scenes: the last batch holds 2 padding examples.
    'eval_batch_size': 4, 'log_every_steps': 2,
}
_STAT_KEYS = {f'{t}_{s}' for t in ('bbox', 'segm') for s in coco_eval.STAT_NAMES}


# ---------------------------------------------------------------------------
# Pure pieces.


def test_step_schedule_warms_up_then_decays_at_decay_steps():
  c = detection_config.detection_config('mask_rcnn', 'coco').optimizer
  c.learning_rate, c.decay_steps, c.decay_factor = 0.02, (6, 8), 0.1
  c.warmup_steps, c.warmup_init_factor = 4, 0.001
  lr = [float(dt.learning_rate_schedule(c, 10)(s)) for s in range(10)]
  # Detectron's WarmupMultiStepLR: factor 0.001 + (1 - 0.001) * s / 4 for s < 4, then
  # 0.02 x 0.1^(number of decay steps <= s).
  warm = [0.02 * (0.001 + 0.999 * s / 4) for s in range(4)]
  np.testing.assert_allclose(lr, warm + [0.02, 0.02, 0.002, 0.002, 0.0002, 0.0002],
                             rtol=1e-4)
  c.warmup_steps = 0
  assert float(dt.learning_rate_schedule(c, 10)(0)) == pytest.approx(0.02)


def test_bad_step_schedule_raises():
  c = detection_config.detection_config('mask_rcnn', 'coco').optimizer
  c.decay_steps = (80000, 60000)
  with pytest.raises(ValueError, match=r'decay_steps=\(80000, 60000\)'):
    dt.build_optimizer(c, 100)
  c = detection_config.detection_config('mask_rcnn', 'coco').optimizer
  c.schedule = 'exp'
  with pytest.raises(ValueError, match=r"schedule='exp'.*'step'"):
    dt.build_optimizer(c, 100)


def test_zero_batch_norm_grads_zeroes_only_bn_owners():
  grads = {'conv': {'kernel': jnp.ones((2, 2))}, 'bn': {'scale': jnp.ones(2), 'bias': jnp.ones(2)},
           'head': {'bias': jnp.full(3, 2.0)}}
  batch_stats = {'bn': {'mean': jnp.zeros(2), 'var': jnp.ones(2)}}
  out = dt.zero_batch_norm_grads(grads, batch_stats)
  assert float(jnp.sum(out['bn']['scale'])) == 0 and float(jnp.sum(out['bn']['bias'])) == 0
  assert float(jnp.sum(out['conv']['kernel'])) == 4 and float(jnp.sum(out['head']['bias'])) == 6


def test_sampling_keys_are_indexed_by_global_image():
  rng = jax.random.PRNGKey(3)
  single = dt.sampling_keys(rng, 4, None)
  # Two devices of 2 images each: device d's keys are the global images 2d, 2d + 1.
  per_device = jax.vmap(lambda _: dt.sampling_keys(rng, 2, 'd'), axis_name='d')(jnp.arange(2))
  np.testing.assert_array_equal(np.asarray(per_device).reshape(single.shape), single)
  assert len({tuple(np.asarray(k)) for k in single}) == 4


def test_iou_types_and_score_keys():
  for name, types, key in (('faster_rcnn', ('bbox',), 'scores'),
                           ('mask_rcnn', ('bbox', 'segm'), 'scores'),
                           ('ms_rcnn', ('bbox', 'segm'), 'mask_scores')):
    config = detection_config.detection_config(name, None)
    assert dt.is_instance_config(config)
    assert dt.iou_types(config) == types and dt.segm_score_key(config) == key


class _GroundTruthPredictor:
  """Stands in for `Predictor`: returns each image's padded ground truth as detections
  (boxes in the resized image, as the model's are), mask probabilities 1 on the box."""

  def __init__(self, num_detections, mask_scores_reversed=False):
    self.d = num_detections
    self.reversed = mask_scores_reversed

  def __call__(self, device_state, batch):
    del device_state
    b, m = batch['gt_valid'].shape
    pad = self.d - m
    scores = np.where(batch['gt_valid'], 0.9 - 0.1 * np.arange(m), 0.0).astype(np.float32)
    out = {'boxes': np.pad(batch['gt_boxes'], ((0, 0), (0, pad), (0, 0))),
           'labels': np.pad(batch['gt_labels'], ((0, 0), (0, pad))),
           'valid': np.pad(batch['gt_valid'], ((0, 0), (0, pad))),
           'scores': np.pad(scores, ((0, 0), (0, pad))),
           'mask_probs': np.ones((b, self.d, 28, 28), np.float32)}
    # Reversed: MaskIoU-rescored scores that rank each image's detections the other way.
    out['mask_scores'] = np.where(out['valid'], 1.0 - out['scores'], 0.0) if self.reversed \
        else out['scores']
    return out


@pytest.mark.parametrize('size', [64, 40])
def test_evaluate_ground_truth_detections_gives_box_ap_one(data_dir, size):
  # At size 40 every box comes out of the model in 40/64 coordinates: AP 1 needs the
  # boxes mapped back to the 64x64 originals.
  config = detection_config.detection_config('mask_rcnn', None)
  config.dataset.name, config.dataset.data_dir = 'digit_scenes/tiny', data_dir
  config.dataset.min_size = config.dataset.max_size = size
  config.dataset.pad_size = (size, size)
  gt = dt.build_ground_truth(config)
  assert len(gt.getImgIds()) == NUM_EVAL
  loader = dt.instance_pipeline.create_eval_loader(config.dataset, global_batch_size=4)
  metrics = dt.evaluate(_GroundTruthPredictor(6), None, loader, gt, iou_types=('bbox', 'segm'))
  assert set(metrics) == _STAT_KEYS
  for s in ('AP', 'AP50', 'AP75', 'APs'):
    assert metrics[f'bbox_{s}'] == pytest.approx(1.0), s
  # Boxes as masks: every digit fills well under its box, so high-IoU mask hits fail.
  assert 0.0 <= metrics['segm_AP'] < 0.5
  # 14-30 px digits on 64x64 scenes: no medium (>= 32^2) or large ground truth.
  assert metrics['bbox_APm'] == metrics['bbox_APl'] == -1.0


def test_evaluate_reports_class_score_ranking_for_mask_scores(data_dir):
  config = detection_config.detection_config('ms_rcnn', None)
  config.dataset.name, config.dataset.data_dir = 'digit_scenes/tiny', data_dir
  gt = dt.build_ground_truth(config)
  loader = dt.instance_pipeline.create_eval_loader(config.dataset, global_batch_size=5)
  metrics = dt.evaluate(_GroundTruthPredictor(4, mask_scores_reversed=True), None, loader, gt,
                        iou_types=('bbox', 'segm'), segm_score_key='mask_scores')
  assert set(metrics) == _STAT_KEYS | {f'segm_cls_score_{s}' for s in coco_eval.STAT_NAMES}
  plain = dt.evaluate(_GroundTruthPredictor(4), None, loader, gt, iou_types=('bbox', 'segm'))
  for s in coco_eval.STAT_NAMES:
    assert metrics[f'segm_cls_score_{s}'] == pytest.approx(plain[f'segm_{s}'])
    assert metrics[f'bbox_{s}'] == pytest.approx(plain[f'bbox_{s}'])


# ---------------------------------------------------------------------------
# End-to-end runs of segjax.main.


def _command(config, workdir, data_dir, **overrides):
  fields = {**_TINY, 'dataset.data_dir': data_dir, **overrides}
  return [sys.executable, '-m', 'segjax.main', f'--config={os.path.join(_CONFIGS, config)}',
          f'--workdir={workdir}', *(f'--config.{k}={v}' for k, v in fields.items())]


def _run(command):
  # The runs share conftest's compilation cache: a rerun compiles nothing (~20 s saved).
  result = subprocess.run(command, capture_output=True, text=True, timeout=600, check=False)
  assert result.returncode == 0, result.stderr[-4000:]
  return result


def _final_eval_line(stderr):
  (line,) = [l for l in stderr.splitlines() if 'final eval:' in l]
  return line.split('final eval:')[1].strip()


def _restore_arrays(workdir, step):
  """A checkpoint's arrays as saved (no model needed to restore them)."""
  manager = ocp.CheckpointManager(os.path.join(workdir, 'checkpoints'),
                                  item_names=('state', 'data'))
  restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(),
                                                           data=ocp.args.JsonRestore()))
  manager.close()
  return restored['state'], restored['data']


def _without_timing(records):
  # Timings and host memory differ between any two runs.
  skip = ('steps_per_second', 'images_per_second', 'host_rss_mib')
  return [{k: v for k, v in r.items() if k not in skip}
          for r in records]


def _check_eval_record(record, extra=()):
  assert set(record) == {'step', 'split', *_STAT_KEYS, *extra}
  for key in set(record) - {'step', 'split'}:
    value = record[key]
    assert value is not None and np.isfinite(value), (key, value)
    if key.endswith(('APm', 'APl')):
      assert value == -1.0, (key, value)  # no digit reaches 32^2 px
    else:
      assert 0.0 <= value <= 1.0, (key, value)


@pytest.mark.slow
def test_mask_rcnn_main_trains_evaluates_and_resumes(tmp_path, data_dir):
  steps = 4
  overrides = dict(num_train_steps=steps, eval_every_steps=steps, checkpoint_every_steps=2)
  workdir = tmp_path / 'run'
  command = _command('mask_rcnn_r50_fpn.py', workdir, data_dir, **overrides)
  first = _run(command)
  records = metric_writer.read_metrics(str(workdir))
  train = [r for r in records if r['split'] == 'train']
  evals = [r for r in records if r['split'] == 'eval']
  assert [r['step'] for r in train] == [2, 4]
  assert [r['step'] for r in evals] == [steps]
  _check_eval_record(evals[0])
  for r in train:
    assert np.isfinite(r['loss']) and r['loss'] > 0
    assert r['loss'] == pytest.approx(sum(v for k, v in r.items() if k.startswith('loss_')),
                                      rel=1e-5)
    assert {'loss_mask', 'loss_objectness', 'grad_norm', 'learning_rate'} <= set(r)
    assert 0 < r['num_gt'] <= 2 * 4  # a batch of 2 scenes of 1-4 digits
  final_line = _final_eval_line(first.stderr)
  assert 'bbox_AP=' in final_line and 'segm_AP=' in final_line
  state, data = _restore_arrays(str(workdir), steps)
  assert int(state['step']) == steps and data['kind'] == 'bytes'

  # Rerun of the finished run: no training, no new records, the same final numbers.
  again = _run(command)
  assert f'at step {steps}.' in again.stderr
  assert metric_writer.read_metrics(str(workdir)) == records
  assert _final_eval_line(again.stderr) == final_line

  # Resume from the step-2 checkpoint (a run stopped after it): steps 3-4 again, to
  # bit-identical parameters, optimizer state and losses.
  resumed_dir = tmp_path / 'resumed'
  shutil.copytree(workdir, resumed_dir)
  shutil.rmtree(resumed_dir / 'checkpoints' / str(steps))
  resumed = _run(_command('mask_rcnn_r50_fpn.py', resumed_dir, data_dir, **overrides))
  assert 'at step 2.' in resumed.stderr
  assert _without_timing(metric_writer.read_metrics(str(resumed_dir))) == \
      _without_timing(records)
  expected, _ = _restore_arrays(str(workdir), steps)
  actual, _ = _restore_arrays(str(resumed_dir), steps)
  for a, b in zip(jax.tree_util.tree_leaves(expected), jax.tree_util.tree_leaves(actual)):
    np.testing.assert_array_equal(a, b)
  assert _final_eval_line(resumed.stderr) == final_line


@pytest.mark.slow
def test_ms_rcnn_main_with_pmap_driver_and_frozen_bn(tmp_path, data_dir):
  # Mask Scoring R-CNN through the pmap driver and pmap Predictor (one CPU device):
  # segm ranked by MaskIoU-rescored scores, plus the class-score ranking for comparison.
  # Frozen BatchNorm (the coco preset's setting) keeps the BN statistics and affine
  # parameters at their initial values while the convolutions train.
  workdir = tmp_path / 'run'
  _run(_command('ms_rcnn_r50_fpn.py', workdir, data_dir, num_train_steps=1, eval_every_steps=1,
                checkpoint_every_steps=1, parallel='pmap', **{'model.freeze_bn': True}))
  (train,) = metric_writer.read_metrics(str(workdir), 'train')
  assert {'loss_maskiou', 'loss_mask'} <= set(train) and np.isfinite(train['loss'])
  assert train['grad_norm'] > 0
  (record,) = metric_writer.read_metrics(str(workdir), 'eval')
  _check_eval_record(record, {f'segm_cls_score_{s}' for s in coco_eval.STAT_NAMES})

  state, _ = _restore_arrays(str(workdir), 1)
  stats = flax.traverse_util.flatten_dict(state['batch_stats'])
  params = flax.traverse_util.flatten_dict(state['params'])
  assert len(stats) == 2 * len({p[:-1] for p in stats}) > 0
  for path, value in stats.items():  # flax's initial mean 0, var 1
    np.testing.assert_array_equal(value, 0.0 if path[-1] == 'mean' else 1.0, err_msg=str(path))
  for owner in {p[:-1] for p in stats}:
    np.testing.assert_array_equal(params[owner + ('bias',)], 0.0)
    scale = params[owner + ('scale',)]
    assert np.all(scale == 1.0) or np.all(scale == 0.0), owner  # ones, or zero-init residual
  # AdamW's first moment is (1 - b1) x the first gradient: zero for every BN parameter,
  # nonzero for the convolutions.
  moments = {}
  for path, value in jax.tree_util.tree_flatten_with_path(state['opt_state'])[0]:
    keys = tuple(str(getattr(k, 'key', getattr(k, 'idx', k))) for k in path)
    if 'mu' in keys:
      moments[keys[keys.index('mu') + 1:]] = np.asarray(value)
  assert set(moments) == set(params)
  for owner in {p[:-1] for p in stats}:
    assert not moments[owner + ('scale',)].any() and not moments[owner + ('bias',)].any()
  assert moments[('backbone', 'body', 'conv1', 'kernel')].any()
  assert moments[('roi_heads', 'maskiou_head', 'maskiou', 'kernel')].any()
