"""Faster / Mask / Mask Scoring R-CNN: parameter layout, shapes, losses (zero ground truth
too), proposal selection and FPN / RPN head parity with torchvision, mask pasting."""

import dataclasses
import functools
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from segjax.models.detection import anchors as anchors_lib
from segjax.models.detection import fpn as fpn_lib
from segjax.models.detection import mask_rcnn as mr
from segjax.models.detection import roi_heads, rpn

SIZE = 32
NUM_CLASSES = 4


def tiny_config(name='mask_rcnn'):
  c = mr.default_detection_model_config(name)
  c.backbone = 'resnet18'
  c.width_multiplier = 0.125
  c.fpn_channels = 16
  c.representation_size = 32
  c.mask_head_channels = 8
  c.anchor_sizes = (8, 16, 32, 64, 128)
  c.rpn_pre_nms_top_n_train = 100
  c.rpn_post_nms_top_n_train = 40
  c.rpn_pre_nms_top_n_test = 50
  c.rpn_post_nms_top_n_test = 20
  c.rpn_batch_size_per_image = 32
  c.box_batch_size_per_image = 16
  c.box_detections_per_img = 8
  return c


def _images(batch=2, seed=0):
  return jnp.asarray(np.random.default_rng(seed).normal(size=(batch, SIZE, SIZE, 3)), jnp.float32)


def _targets(with_gt=(True, True)):
  boxes = np.zeros((2, 3, 4), np.float32)
  labels = np.zeros((2, 3), np.int32)
  valid = np.zeros((2, 3), bool)
  masks = np.zeros((2, 3, SIZE, SIZE), np.uint8)
  for i, has in enumerate(with_gt):
    if has:
      boxes[i, 0] = (4, 6, 20, 26)
      labels[i, 0] = 2
      valid[i, 0] = True
      masks[i, 0, 8:24, 6:18] = 1
  return {'boxes': jnp.asarray(boxes), 'labels': jnp.asarray(labels),
          'valid': jnp.asarray(valid), 'masks': jnp.asarray(masks)}


@functools.lru_cache(maxsize=None)
def _model_and_variables(name):
  model = mr.build_detector(tiny_config(name), num_classes=NUM_CLASSES)
  variables = jax.jit(functools.partial(model.init, train=False))(
      {'params': jax.random.PRNGKey(0)}, _images())
  return model, variables


def _paths(tree):
  return {'/'.join(str(k.key) for k in path)
          for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]}


def test_parameter_names_mirror_torchvision():
  _, variables = _model_and_variables('ms_rcnn')
  paths = _paths(variables['params'])
  expected = {
      'backbone/body/conv1/kernel', 'backbone/body/layer4_1/conv2/kernel',
      *(f'backbone/fpn/{b}_{i}/{p}' for b in ('inner_blocks', 'layer_blocks')
        for i in range(4) for p in ('kernel', 'bias')),
      'rpn/head/conv/kernel', 'rpn/head/cls_logits/kernel', 'rpn/head/bbox_pred/kernel',
      'roi_heads/box_head/fc6/kernel', 'roi_heads/box_head/fc7/kernel',
      'roi_heads/box_predictor/cls_score/kernel', 'roi_heads/box_predictor/bbox_pred/kernel',
      *(f'roi_heads/mask_head/mask_fcn{i}/kernel' for i in range(1, 5)),
      'roi_heads/mask_predictor/conv5_mask_kernel', 'roi_heads/mask_predictor/conv5_mask_bias',
      'roi_heads/mask_predictor/mask_fcn_logits/kernel',
      *(f'roi_heads/maskiou_head/maskiou_fcn{i}/kernel' for i in range(1, 5)),
      'roi_heads/maskiou_head/maskiou_fc1/kernel', 'roi_heads/maskiou_head/maskiou/kernel',
  }
  assert expected <= paths, sorted(expected - paths)
  p = variables['params']
  assert p['rpn']['head']['cls_logits']['kernel'].shape == (1, 1, 16, 3)
  assert p['rpn']['head']['bbox_pred']['kernel'].shape == (1, 1, 16, 12)
  assert p['roi_heads']['box_head']['fc6']['kernel'].shape == (7 * 7 * 16, 32)
  assert p['roi_heads']['box_predictor']['bbox_pred']['kernel'].shape == (32, 4 * NUM_CLASSES)
  assert p['roi_heads']['mask_predictor']['conv5_mask_kernel'].shape == (2, 2, 8, 8)
  # The MaskIoU head sees the RoI features plus one mask channel (MS R-CNN §3.2).
  assert p['roi_heads']['maskiou_head']['maskiou_fcn1']['kernel'].shape == (3, 3, 16 + 1, 8)
  assert p['roi_heads']['maskiou_head']['maskiou']['kernel'].shape == (32, NUM_CLASSES)


def test_faster_rcnn_has_no_mask_branch():
  _, variables = _model_and_variables('faster_rcnn')
  assert set(variables['params']['roi_heads']) == {'box_head', 'box_predictor'}


@pytest.mark.parametrize('name', ['faster_rcnn', 'mask_rcnn', 'ms_rcnn'])
def test_inference_outputs(name):
  model, variables = _model_and_variables(name)
  sizes = jnp.asarray([[SIZE, SIZE], [20, 24]], jnp.int32)
  out = jax.jit(lambda v, x: model.apply(v, x, train=False, image_sizes=sizes))(
      variables, _images())
  d = 8
  assert out['boxes'].shape == (2, d, 4)
  assert out['scores'].shape == out['labels'].shape == out['valid'].shape == (2, d)
  np.testing.assert_array_equal(out['num_detections'], np.sum(out['valid'], 1))
  assert out['proposals'].shape == (2, 20, 4)
  valid = np.asarray(out['valid'])
  labels = np.asarray(out['labels'])
  assert np.all((labels[valid] >= 1) & (labels[valid] < NUM_CLASSES))
  assert np.all(labels[~valid] == 0) and np.all(np.asarray(out['boxes'])[~valid] == 0)
  boxes = np.asarray(out['boxes'])
  # Detections of image 1 are clipped to its unpadded 20 x 24 (h x w).
  assert boxes[1][:, [0, 2]].max(initial=0) <= 24 and boxes[1][:, [1, 3]].max(initial=0) <= 20
  if name == 'faster_rcnn':
    assert 'mask_probs' not in out
  else:
    assert out['mask_probs'].shape == (2, d, 28, 28)
    assert np.all((out['mask_probs'] >= 0) & (out['mask_probs'] <= 1))
  if name == 'ms_rcnn':
    np.testing.assert_allclose(out['mask_scores'], out['scores'] * out['maskiou'] * valid,
                               rtol=1e-6)


def _loss_and_grads(name, targets):
  model, variables = _model_and_variables(name)
  keys = jax.random.split(jax.random.PRNGKey(3), 2)

  def loss_fn(params):
    out, _ = model.apply({'params': params, 'batch_stats': variables['batch_stats']},
                         _images(), train=True, targets=targets, sampling_keys=keys,
                         mutable=['batch_stats'])
    losses = mr.finalize_losses(out['loss_terms'])
    return losses['loss'], losses

  (_, losses), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(variables['params'])
  return jax.device_get(losses), grads


@pytest.mark.parametrize('name', ['faster_rcnn', 'ms_rcnn'])
def test_losses_finite_with_zero_ground_truth(name):
  losses, grads = _loss_and_grads(name, _targets((False, False)))
  expected = {'loss', 'loss_objectness', 'loss_rpn_box_reg', 'loss_classifier', 'loss_box_reg'}
  if name == 'ms_rcnn':
    expected |= {'loss_mask', 'loss_maskiou'}
  assert set(losses) == expected
  assert all(np.isfinite(v) for v in losses.values()), losses
  # No positives anywhere: every regression / mask term is exactly zero.
  for k in ('loss_rpn_box_reg', 'loss_box_reg', 'loss_mask', 'loss_maskiou'):
    assert losses.get(k, 0.0) == 0.0, (k, losses)
  # All sampled anchors are negatives, so the objectness loss is a plain BCE > 0.
  assert losses['loss_objectness'] > 0
  assert all(np.all(np.isfinite(g)) for g in jax.tree_util.tree_leaves(grads))


def test_losses_with_ground_truth_in_one_image():
  losses, grads = _loss_and_grads('ms_rcnn', _targets((True, False)))
  assert all(np.isfinite(v) for v in losses.values()), losses
  # The ground-truth box itself is appended to the proposals, so there are positives.
  assert losses['loss_mask'] > 0 and losses['loss_box_reg'] >= 0
  assert all(np.all(np.isfinite(g)) for g in jax.tree_util.tree_leaves(grads))
  total = sum(v for k, v in losses.items() if k != 'loss')
  np.testing.assert_allclose(losses['loss'], total, rtol=1e-6)


def test_finalize_losses_divides_sums_by_counts():
  terms = {'a': (jnp.float32(6.0), jnp.float32(3.0)), 'b': (jnp.float32(0.0), jnp.float32(0.0))}
  losses = mr.finalize_losses(terms)
  assert float(losses['a']) == 2.0 and float(losses['b']) == 0.0 and float(losses['loss']) == 2.0


def test_smooth_l1_values():
  x = jnp.asarray([0.0, 0.05, -0.2, 1.0])
  beta = 1.0 / 9
  expected = [0.0, 0.5 * 0.05**2 / beta, 0.2 - 0.5 * beta, 1.0 - 0.5 * beta]
  np.testing.assert_allclose(rpn.smooth_l1(x, beta), expected, rtol=1e-6)
  np.testing.assert_allclose(rpn.smooth_l1(x, 0.0), np.abs(x))


def test_mask_iou_targets_hand_computed():
  logits = jnp.full((28, 28), -5.0).at[:14, :].set(5.0)  # predicted: top half
  target = jnp.zeros((28, 28)).at[7:21, :].set(1.0)  # target: middle half
  # intersection rows 7..13 (7 rows), union rows 0..20 (21 rows)
  np.testing.assert_allclose(roi_heads.mask_iou_targets(logits, target), 7 / 21, rtol=1e-6)
  np.testing.assert_allclose(roi_heads.mask_iou_targets(-logits * 0 - 1, target * 0), 0.0)


def test_proposals_carry_no_gradient():
  anchors = jnp.asarray(anchors_lib.AnchorGenerator(((8.0,),), ((1.0,),))((16, 16), [(4, 4)]))
  def f(objectness, deltas):
    p = rpn.select_proposals(objectness, deltas, anchors, (16,), jnp.asarray([[16, 16]]),
                             pre_nms_top_n=10, post_nms_top_n=5, nms_thresh=0.7)
    return jnp.sum(p.boxes) + jnp.sum(p.scores)
  rng = np.random.default_rng(0)
  g = jax.grad(f, argnums=(0, 1))(jnp.asarray(rng.normal(size=(1, 16)), jnp.float32),
                                  jnp.asarray(rng.normal(size=(1, 16, 4)) * 0.1, jnp.float32))
  assert all(float(jnp.max(jnp.abs(x))) == 0.0 for x in g)


def test_paste_masks_fills_integer_box_exactly():
  # A constant mask on a box of integer corners no wider than 28 pastes to exactly the
  # pixels inside the box (pixel centres x + 0.5 in (x1, x2)), thresholded at 0.5.
  masks = jnp.ones((2, 28, 28))
  boxes = jnp.asarray([[10.0, 5.0, 30.0, 25.0], [0.0, 0.0, 7.0, 3.0]])
  pasted = np.asarray(mr.paste_masks_in_image(masks, boxes, (32, 40)))
  expected = np.zeros((2, 32, 40), bool)
  expected[0, 5:25, 10:30] = True
  expected[1, 0:3, 0:7] = True
  np.testing.assert_array_equal(pasted > 0.5, expected)
  np.testing.assert_allclose(pasted[0, 10, 12], 1.0, rtol=1e-6)


def test_paste_masks_left_half():
  # Left half of the mask on; box 28 px wide at x1 = 2: image columns 2..15 are on.
  masks = jnp.zeros((1, 28, 28)).at[:, :, :14].set(1.0)
  pasted = np.asarray(mr.paste_masks_in_image(masks, jnp.asarray([[2.0, 0.0, 30.0, 28.0]]),
                                              (28, 32)))
  np.testing.assert_array_equal(np.flatnonzero(pasted[0, 5] > 0.5), np.arange(2, 16))


def test_config_validation_names_bad_values():
  c = tiny_config()
  c.backbone = 'vgg16'
  with pytest.raises(ValueError, match=r"model.backbone='vgg16'.*resnet50"):
    mr.validate_detection_model_config(c)
  c = tiny_config()
  c.box_loss = 'l2'
  with pytest.raises(ValueError, match=r"model.box_loss='l2'.*smooth_l1"):
    mr.validate_detection_model_config(c)
  c = tiny_config()
  c.anchor_sizes = (32, 64)
  with pytest.raises(ValueError, match='anchor_sizes'):
    mr.validate_detection_model_config(c)
  with pytest.raises(ValueError, match='faster_rcnn'):
    mr.default_detection_model_config('yolo')


# ---------------------------------------------------------------------------
# Parity with torchvision (where installed).


def _torch():
  torch = pytest.importorskip('torch')
  pytest.importorskip('torchvision')
  return torch


def _conv_weight(torch, kernel):
  return torch.from_numpy(np.asarray(kernel).transpose(3, 2, 0, 1).copy())


def test_fpn_matches_torchvision():
  torch = _torch()
  from torchvision.ops import FeaturePyramidNetwork
  from torchvision.ops.feature_pyramid_network import LastLevelMaxPool
  channels = (8, 16, 24, 32)
  rng = np.random.default_rng(0)
  # Odd sizes: the top-down nearest upsampling is to the lateral's size, not x2.
  shapes = [(13, 11), (7, 6), (4, 3), (2, 2)]
  feats = {f'res{i + 2}': jnp.asarray(rng.normal(size=(2, h, w, c)), jnp.float32)
           for i, ((h, w), c) in enumerate(zip(shapes, channels))}
  module = fpn_lib.FeaturePyramidNetwork(out_channels=12)
  params = module.init(jax.random.PRNGKey(0), feats)['params']
  ours = module.apply({'params': params}, feats)

  ref = FeaturePyramidNetwork(list(channels), 12, extra_blocks=LastLevelMaxPool()).eval()
  with torch.no_grad():
    for kind in ('inner_blocks', 'layer_blocks'):
      for i in range(4):
        conv = getattr(ref, kind)[i][0]
        conv.weight.copy_(_conv_weight(torch, params[f'{kind}_{i}']['kernel']))
        conv.bias.copy_(torch.from_numpy(np.asarray(params[f'{kind}_{i}']['bias'])))
    out = ref({str(i): torch.from_numpy(np.asarray(feats[f'res{i + 2}']).transpose(0, 3, 1, 2))
               for i in range(4)})
  for name, key in zip(fpn_lib.FPN_OUTPUTS, ['0', '1', '2', '3', 'pool']):
    np.testing.assert_allclose(np.asarray(ours[name]), out[key].numpy().transpose(0, 2, 3, 1),
                               rtol=1e-4, atol=1e-5, err_msg=name)


def test_rpn_head_and_proposals_match_torchvision():
  torch = _torch()
  from torchvision.models.detection.anchor_utils import AnchorGenerator as TvAnchorGenerator
  from torchvision.models.detection.image_list import ImageList
  from torchvision.models.detection.rpn import RegionProposalNetwork, RPNHead
  rng = np.random.default_rng(1)
  channels, image = 8, (64, 64)
  shapes = [(16, 16), (8, 8), (4, 4), (2, 2), (1, 1)]
  feats = [jnp.asarray(rng.normal(size=(2, h, w, channels)), jnp.float32) for h, w in shapes]
  head = rpn.RPNHead(num_anchors=3)
  params = head.init(jax.random.PRNGKey(0), feats)['params']
  # A larger init than the paper's 0.01 so that objectness varies across anchors.
  params = jax.tree_util.tree_map(lambda p: p * 30.0, params)
  objectness, deltas = head.apply({'params': params}, feats)

  sizes = ((8,), (16,), (32,), (64,), (128,))
  ratios = ((0.5, 1.0, 2.0),) * 5
  tv_head = RPNHead(channels, 3)
  with torch.no_grad():
    tv_head.conv[0][0].weight.copy_(_conv_weight(torch, params['conv']['kernel']))
    tv_head.conv[0][0].bias.copy_(torch.from_numpy(np.asarray(params['conv']['bias'])))
    for name in ('cls_logits', 'bbox_pred'):
      getattr(tv_head, name).weight.copy_(_conv_weight(torch, params[name]['kernel']))
      getattr(tv_head, name).bias.copy_(torch.from_numpy(np.asarray(params[name]['bias'])))
  tv_rpn = RegionProposalNetwork(
      TvAnchorGenerator(sizes, ratios), tv_head, 0.7, 0.3, 256, 0.5,
      pre_nms_top_n={'training': 100, 'testing': 100},
      post_nms_top_n={'training': 30, 'testing': 30}, nms_thresh=0.7).eval()
  image_sizes = [(64, 64), (50, 40)]
  with torch.no_grad():
    tv_feats = {str(i): torch.from_numpy(np.asarray(f).transpose(0, 3, 1, 2).copy())
                for i, f in enumerate(feats)}
    images = ImageList(torch.zeros(2, 3, *image), image_sizes)
    tv_boxes, _ = tv_rpn(images, tv_feats)
    # Head outputs in torchvision's flattened anchor order.
    from torchvision.models.detection.rpn import concat_box_prediction_layers
    obj, dl = tv_head(list(tv_feats.values()))
    tv_obj, tv_dl = concat_box_prediction_layers(obj, dl)
  np.testing.assert_allclose(np.asarray(objectness).reshape(-1), tv_obj.numpy().reshape(-1),
                             rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(np.asarray(deltas).reshape(-1, 4), tv_dl.numpy(), rtol=1e-4,
                             atol=1e-4)

  generator = anchors_lib.AnchorGenerator(tuple((float(s[0]),) for s in sizes), ratios)
  anchors = jnp.asarray(generator(image, shapes))
  props = rpn.select_proposals(objectness, deltas, anchors,
                               generator.num_anchors_per_level(shapes),
                               jnp.asarray(image_sizes, jnp.int32), pre_nms_top_n=100,
                               post_nms_top_n=30, nms_thresh=0.7)
  for i in range(2):
    ours = np.asarray(props.boxes[i])[np.asarray(props.valid[i])]
    ref = tv_boxes[i].numpy()
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-3)


# ---------------------------------------------------------------------------
# A tiny Mask R-CNN trains with the pmap and jit drivers on 2 simulated devices.

_SCRIPT = os.path.join(os.path.dirname(__file__), 'detection_parallel_run.py')


@pytest.mark.slow
def test_tiny_mask_rcnn_trains_same_under_pmap_and_jit():
  import json
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=2')
  result = subprocess.run([sys.executable, _SCRIPT], env=env, capture_output=True, text=True,
                          timeout=900, check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  report = json.loads(result.stdout.strip().splitlines()[-1])
  single = np.asarray(report['losses']['single'])
  assert np.all(np.isfinite(single))
  assert single[-1] < single[0], single  # the same batch, three SGD steps
  for kind in ('pmap', 'jit'):
    np.testing.assert_allclose(report['losses'][kind], single, rtol=1e-4, err_msg=kind)
    assert report[f'{kind}_params_diff'] < 1e-3 * report['param_change'], report


def test_roi_pool_pooler_trains_and_differs_from_roi_align():
  """model.roi_pooler='roi_pool' (Mask R-CNN Table 2c's baseline) builds, trains, and
  pools differently from RoIAlign on the same weights."""
  c = tiny_config('mask_rcnn')
  c.roi_pooler = 'roi_pool'
  model = mr.build_detector(c, num_classes=NUM_CLASSES)
  assert model.roi_heads_config.pooler == 'roi_pool'
  _, variables = _model_and_variables('mask_rcnn')
  keys = jax.random.split(jax.random.PRNGKey(3), 2)

  def loss_fn(params):
    out, _ = model.apply({'params': params, 'batch_stats': variables['batch_stats']},
                         _images(), train=True, targets=_targets((True, False)),
                         sampling_keys=keys, mutable=['batch_stats'])
    return mr.finalize_losses(out['loss_terms'])['loss']

  loss, grads = jax.jit(jax.value_and_grad(loss_fn))(variables['params'])
  assert np.isfinite(loss)
  assert all(np.all(np.isfinite(g)) for g in jax.tree_util.tree_leaves(grads))
  align_losses, _ = _loss_and_grads('mask_rcnn', _targets((True, False)))
  assert abs(float(loss) - float(align_losses['loss'])) > 1e-6
  c.roi_pooler = 'roi_warp'
  with pytest.raises(ValueError, match=r"roi_pooler='roi_warp'.*roi_align"):
    mr.build_detector(c, num_classes=NUM_CLASSES)


@pytest.mark.parametrize('name', ['mask_rcnn', 'ms_rcnn'])
def test_mask_slot_buckets_give_the_same_loss_and_gradients(name):
  """The mask branch on the smallest bucket of slots holding the positives (16 of 32
  here) == on all slots: same loss terms and gradients."""
  c = tiny_config(name)
  c.box_batch_size_per_image = 128  # 32 mask slots: buckets (16, 32)
  model = mr.build_detector(c, num_classes=NUM_CLASSES)
  assert model.roi_heads_config.mask_bucket_sizes == (16, 32)
  full = model.clone(roi_heads_config=dataclasses.replace(model.roi_heads_config,
                                                          mask_roi_buckets=False))
  assert full.roi_heads_config.mask_bucket_sizes == (32,)
  _, variables = _model_and_variables(name)
  keys = jax.random.split(jax.random.PRNGKey(3), 2)

  def loss_fn(params, m):
    out, _ = m.apply({'params': params, 'batch_stats': variables['batch_stats']}, _images(),
                     train=True, targets=_targets((True, True)), sampling_keys=keys,
                     mutable=['batch_stats'])
    losses = mr.finalize_losses(out['loss_terms'])
    return losses['loss'], losses

  grad = jax.jit(jax.value_and_grad(loss_fn, has_aux=True), static_argnums=1)
  (_, bucketed), g_bucketed = grad(variables['params'], model)
  (_, reference), g_reference = grad(variables['params'], full)
  assert bucketed['loss_mask'] > 0
  for k in reference:
    np.testing.assert_allclose(bucketed[k], reference[k], rtol=1e-6, err_msg=k)
  # Sums over 16 vs 32 slots round differently; the backprop through RoIAlign into the
  # backbone amplifies that to ~1e-5 of a leaf's norm (1.4e-4 on one small leaf), so
  # compare each leaf's error to its norm; a dropped positive would change it by O(1).
  for a, b in zip(jax.tree_util.tree_leaves(g_bucketed), jax.tree_util.tree_leaves(g_reference)):
    assert np.linalg.norm(a - b) <= 1e-3 * np.linalg.norm(b) + 1e-9, (a.shape,)


def _kernel_grad_convs_in_conds(jaxpr, inside=False):
  """Output shapes of the convolutions computing a filter gradient (output [k, k, C_in,
  C_out]; activations here are [slots >= 16, H, W, C]) inside `cond` branches."""
  found = []
  for eqn in jaxpr.eqns:
    if inside and eqn.primitive.name == 'conv_general_dilated':
      shape = eqn.outvars[0].aval.shape
      if shape[0] == shape[1] and shape[0] <= 3:
        found.append(shape)
    for param in eqn.params.values():
      for sub in param if isinstance(param, (list, tuple)) else (param,):
        sub = getattr(sub, 'jaxpr', sub)
        if hasattr(sub, 'eqns'):
          found += _kernel_grad_convs_in_conds(sub, inside or eqn.primitive.name == 'cond')
  return found


def test_mask_branch_in_the_bucket_switch_has_no_xla_filter_gradient_convs():
  # XLA CPU runs a conv's own filter gradient ~80x slower inside a conditional
  # (segjax.benchmarks.nested_conv_bench), so with buckets the mask branch computes
  # filter gradients as per-tap matmuls; without buckets (no switch) XLA's are used.
  _, variables = _model_and_variables('mask_rcnn')
  keys = jax.random.split(jax.random.PRNGKey(3), 2)
  c = tiny_config('mask_rcnn')
  c.box_batch_size_per_image = 128

  def loss_fn(params, m):
    out, _ = m.apply({'params': params, 'batch_stats': variables['batch_stats']}, _images(),
                     train=True, targets=_targets((True, True)), sampling_keys=keys,
                     mutable=['batch_stats'])
    return mr.finalize_losses(out['loss_terms'])['loss']

  model = mr.build_detector(c, num_classes=NUM_CLASSES)
  jaxpr = jax.make_jaxpr(jax.grad(loss_fn), static_argnums=1)(variables['params'], model)
  assert any(e.primitive.name == 'cond' for e in jaxpr.jaxpr.eqns)
  assert _kernel_grad_convs_in_conds(jaxpr.jaxpr) == []
  # The check detects XLA's filter gradient of a conv inside a switch.
  def switched(w, x, i):
    conv = lambda w, x: jnp.sum(jax.lax.conv_general_dilated(
        x, w, (1, 1), 'SAME', dimension_numbers=('NHWC', 'HWIO', 'NHWC')))
    return jax.lax.switch(i, [conv, conv], w, x)
  plain = jax.make_jaxpr(jax.grad(switched))(jnp.ones((3, 3, 4, 4)), jnp.ones((16, 8, 8, 4)), 0)
  assert set(_kernel_grad_convs_in_conds(plain.jaxpr)) == {(3, 3, 4, 4)}  # one per branch
