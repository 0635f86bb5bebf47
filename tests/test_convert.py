"""torchvision -> segjax weight conversion, proven by output parity with torchvision.

Each torchvision model is built with random weights (`weights=None,
weights_backbone=None`), its BatchNorm statistics and affine parameters randomised
too (torchvision initialises them to the identity, which would hide a swapped
mean / var), converted, and run next to torchvision in eval mode, float32, on the
same random input. "rel" below is max |segjax - torchvision| / max |torchvision|
over an output. Measured numbers: `python -m pytest -q -s tests/test_convert.py`
prints a `parity` line per output (README, "Import torchvision weights").
"""

import functools
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip('torch')
torchvision = pytest.importorskip('torchvision')

from segjax.convert import checkpoint, from_torchvision  # noqa: E402
from segjax.models.detection import mask_rcnn  # noqa: E402

REL_TOL = 1e-4
SIZE = 64  # backbones and segmentation models
DET_SIZE = 256
# Detection settings shared by both sides (smaller than the defaults, for CI time).
DET_KWARGS = dict(rpn_pre_nms_top_n_test=300, rpn_post_nms_top_n_test=100,
                  box_detections_per_img=20)
DET_CLASSES = 5


def _randomize(model, seed=0):
  """BatchNorm statistics / affine params away from the identity, in place."""
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for m in model.modules():
      if isinstance(m, torch.nn.BatchNorm2d):
        n = m.num_features
        m.running_mean.copy_(0.1 * torch.randn(n, generator=gen))
        m.running_var.copy_(0.5 + 1.5 * torch.rand(n, generator=gen))
        m.weight.copy_(0.5 + torch.rand(n, generator=gen))
        m.bias.copy_(0.1 * torch.randn(n, generator=gen))
  return model.eval()


def _state_dict(model):
  return {k: v.detach().numpy() for k, v in model.state_dict().items()}


def _nchw(x):
  return torch.from_numpy(np.ascontiguousarray(np.asarray(x).transpose(0, 3, 1, 2)))


def _nhwc(t):
  return t.detach().numpy().transpose(0, 2, 3, 1)


def _check(arch, name, ours, ref, rel_tol=REL_TOL):
  ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
  assert ours.shape == ref.shape, (arch, name, ours.shape, ref.shape)
  max_abs = float(np.max(np.abs(ours - ref)))
  rel = max_abs / float(np.max(np.abs(ref)))
  print(f'parity {arch} {name}: max abs {max_abs:.2e}, max rel {rel:.2e}')
  assert rel < rel_tol, (arch, name, max_abs, rel)
  return max_abs, rel


def _image(size, seed=0):
  return np.random.default_rng(seed).normal(size=(1, size, size, 3)).astype(np.float32)


# ---------------------------------------------------------------------------
# Backbones.


def _torch_resnet_features(model, x):
  out = {}
  y = model.relu(model.bn1(model.conv1(x)))
  out['stem'] = y
  y = model.maxpool(y)
  for i in range(1, 5):
    y = getattr(model, f'layer{i}')(y)
    out[f'res{i + 1}'] = y
  return out


def _torch_vgg_features(model, x):
  out, block = {}, 1
  for layer in model.features:
    x = layer(x)
    if isinstance(layer, torch.nn.MaxPool2d):
      out[f'pool{block}'] = x
      block += 1
  return out


@pytest.mark.parametrize('arch', ['resnet18', 'resnet34', 'resnet50', 'resnet101', 'resnet152'])
def test_resnet_feature_maps_match_torchvision(arch):
  torch.manual_seed(0)
  tv = _randomize(getattr(torchvision.models, arch)(weights=None))
  sd = _state_dict(tv)
  variables, report = from_torchvision.convert_state_dict(arch, sd)
  assert report.unused == ['fc.bias', 'fc.weight']  # the ImageNet classifier
  module = from_torchvision.build_module(arch, sd)
  x = _image(SIZE)
  # Eager apply: for one call it is faster than compiling ResNet-152.
  ours = module.apply(variables, jnp.asarray(x), train=False)
  with torch.no_grad():
    ref = _torch_resnet_features(tv, _nchw(x))
  for name in ('stem', 'res2', 'res3', 'res4', 'res5'):
    _check(arch, name, ours[name], _nhwc(ref[name]))


@pytest.mark.parametrize('arch', ['vgg16', 'vgg16_bn'])
def test_vgg_feature_maps_and_fc_layers_match_torchvision(arch):
  torch.manual_seed(0)
  tv = _randomize(getattr(torchvision.models, arch)(weights=None))
  sd = _state_dict(tv)
  variables, report = from_torchvision.convert_state_dict(arch, sd)
  assert report.unused == ['classifier.6.bias', 'classifier.6.weight']
  module = from_torchvision.build_module(arch, sd)
  x = _image(SIZE)
  ours = module.apply(variables, jnp.asarray(x), train=False)
  with torch.no_grad():
    ref = _torch_vgg_features(tv, _nchw(x))
  for name in ('pool1', 'pool2', 'pool3', 'pool4', 'pool5'):
    _check(arch, name, ours[name], _nhwc(ref[name]))

  # fc6 / fc7 as convolutions: on a 7x7 pool5 (a 224x224 input), the 7x7 fc6 conv at the
  # centre sees the whole map, as torchvision's Linear on the flattened map does.
  pool5 = np.random.default_rng(1).normal(size=(1, 7, 7, 512)).astype(np.float32)
  p = variables['params']['backbone']
  hi = jax.lax.Precision.HIGHEST
  fc6 = jax.lax.conv_general_dilated(pool5, p['fc6']['kernel'], (1, 1), 'VALID',
                                     dimension_numbers=('NHWC', 'HWIO', 'NHWC'), precision=hi)
  fc7 = jnp.einsum('bhwc,hwcd->bhwd', jax.nn.relu(fc6 + p['fc6']['bias']), p['fc7']['kernel'],
                   precision=hi) + p['fc7']['bias']
  with torch.no_grad():
    ref = tv.classifier[:4](torch.flatten(_nchw(pool5), 1))  # fc6, ReLU, dropout, fc7
  _check(arch, 'fc7', fc7[0, 0, 0], ref[0].numpy())


# ---------------------------------------------------------------------------
# Semantic segmentation models.


@pytest.mark.parametrize('arch', ['fcn_resnet50', 'fcn_resnet101', 'deeplabv3_resnet50',
                                  'deeplabv3_resnet101'])
def test_segmentation_logits_match_torchvision(arch):
  torch.manual_seed(0)
  tv = _randomize(getattr(torchvision.models.segmentation, arch)(
      weights=None, weights_backbone=None, num_classes=7, aux_loss=True))
  sd = _state_dict(tv)
  variables, report = from_torchvision.convert_state_dict(arch, sd)
  assert report.unused == []
  config = from_torchvision.segjax_model_config(arch, sd)
  assert (config.name, config.output_stride, config.aux_loss) == (
      'fcn_resnet' if arch.startswith('fcn') else 'deeplab_v3', 8, True)
  module = from_torchvision.build_module(arch, sd)
  # 60 x 52: not multiples of the stride, so the final resize must be torchvision's
  # (straight to the input size), not x8 + crop.
  x = np.random.default_rng(0).normal(size=(1, 60, 52, 3)).astype(np.float32)
  ours = module.apply(variables, jnp.asarray(x), train=False)
  with torch.no_grad():
    ref = tv(_nchw(x))
  _check(arch, 'logits', ours['logits'], _nhwc(ref['out']))
  _check(arch, 'aux_logits', ours['aux_logits'], _nhwc(ref['aux']))


# ---------------------------------------------------------------------------
# Faster / Mask R-CNN.


@functools.lru_cache(maxsize=None)
def _torch_detector(arch):
  """torchvision detector with random weights, sharpened so that parity is testable.

  Random init leaves every RPN objectness near 0 and every mask probability near 0.5,
  where float rounding reorders proposals and flips mask pixels; the RPN classifier
  and the mask logits are scaled up (x30) so that scores are well separated.
  The transform is made the identity (no resize at min_size = max_size = the input,
  mean 0, std 1) so both sides see the same pixels.
  """
  torch.manual_seed(0)
  build = getattr(torchvision.models.detection, arch)
  tv = build(weights=None, weights_backbone=None, num_classes=DET_CLASSES, min_size=DET_SIZE,
             max_size=DET_SIZE, image_mean=[0.0] * 3, image_std=[1.0] * 3, **DET_KWARGS)
  _randomize(tv)
  with torch.no_grad():
    tv.rpn.head.cls_logits.weight.mul_(30.0)
    tv.rpn.head.cls_logits.bias.mul_(30.0)
    if hasattr(tv.roi_heads, 'mask_predictor') and tv.roi_heads.mask_predictor is not None:
      tv.roi_heads.mask_predictor.mask_fcn_logits.weight.mul_(30.0)
  return tv.eval()


def _torch_detections(tv, x):
  with torch.no_grad():
    images, _ = tv.transform([_nchw(x)[0]])
    assert tuple(images.tensors.shape[-2:]) == x.shape[1:3]
    features = tv.backbone(images.tensors)
    proposals, _ = tv.rpn(images, features)
    detections, _ = tv.roi_heads(features, proposals, images.image_sizes)
  return proposals[0].numpy(), {k: v.numpy() for k, v in detections[0].items()}


def _mask_iou(a, b):
  inter = np.sum(a & b, axis=(-2, -1))
  union = np.sum(a | b, axis=(-2, -1))
  return np.where(union > 0, inter / np.maximum(union, 1), 1.0)


@pytest.mark.parametrize('arch', ['maskrcnn_resnet50_fpn', 'fasterrcnn_resnet50_fpn'])
def test_detection_outputs_match_torchvision(arch, tmp_path):
  tv = _torch_detector(arch)
  # Through the file formats: .pth -> converter -> Orbax -> variables.
  pth = str(tmp_path / 'weights.pth')
  torch.save(tv.state_dict(), pth)
  out_dir, report = from_torchvision.convert_file(arch, pth, str(tmp_path / 'converted'))
  assert report.unused == []
  variables, metadata = checkpoint.load_variables(out_dir)
  assert metadata['arch'] == arch and metadata['num_classes'] == DET_CLASSES
  config = from_torchvision.segjax_model_config(arch, _state_dict(tv))
  for field, value in DET_KWARGS.items():
    config[field] = value
  model = mask_rcnn.build_detector(config, num_classes=DET_CLASSES)
  x = np.random.default_rng(0).uniform(0.0, 1.0, (1, DET_SIZE, DET_SIZE, 3)).astype(np.float32)
  ours = jax.device_get(jax.jit(lambda v, x: model.apply(v, x, train=False))(
      variables, jnp.asarray(x)))
  ref_proposals, ref = _torch_detections(tv, x)

  proposals = ours['proposals'][0][ours['proposals_valid'][0]]
  assert proposals.shape == ref_proposals.shape == (DET_KWARGS['rpn_post_nms_top_n_test'], 4)
  # The same set: proposals whose objectness differs by float rounding only may swap
  # places in the score order, so each is compared with its nearest counterpart.
  nearest = np.argmin(np.abs(proposals[:, None] - ref_proposals[None]).max(-1), axis=1)
  assert len(set(nearest.tolist())) == len(proposals)
  _check(arch, 'proposals', proposals, ref_proposals[nearest])
  n = int(ours['num_detections'][0])
  assert n == len(ref['boxes']) > 5, (n, len(ref['boxes']))
  np.testing.assert_array_equal(ours['labels'][0][:n], ref['labels'])
  _check(arch, 'boxes', ours['boxes'][0][:n], ref['boxes'])
  _check(arch, 'scores', ours['scores'][0][:n], ref['scores'])
  if 'masks' not in ref:
    assert 'mask_probs' not in ours
    return
  probs, ref_probs = ours['mask_probs'][0][:n], ref['masks'][:, 0]
  # The 28x28 mask probabilities (max abs: sigmoid of logits ~x30 as sharp as
  # torchvision's random init), their binarised masks, and the masks pasted into the
  # image (both with segjax's paste, see the README note on torchvision's).
  max_abs = float(np.max(np.abs(probs - ref_probs)))
  print(f'parity {arch} mask_probs: max abs {max_abs:.2e}')
  assert max_abs < 2e-2
  assert np.min(_mask_iou(probs > 0.5, ref_probs > 0.5)) >= 0.99
  paste = lambda p: np.asarray(mask_rcnn.paste_masks_in_image(
      p, ours['boxes'][0][:n], (DET_SIZE, DET_SIZE))) > 0.5
  ious = _mask_iou(paste(probs), paste(ref_probs))
  print(f'parity {arch} pasted mask IoU: min {ious.min():.4f}')
  assert ious.min() >= 0.99


# ---------------------------------------------------------------------------
# Errors and the command line.


def test_bad_arch_names_the_valid_choices():
  with pytest.raises(ValueError, match=r"--arch='resnet19'.*'resnet18'.*'vgg16_bn'"):
    from_torchvision.check_arch('resnet19')


def test_wrong_state_dict_names_the_missing_key():
  sd = _state_dict(torchvision.models.resnet18(weights=None))
  with pytest.raises(ValueError, match=r"no 'layer1.2.bn1.bias' for segjax params "
                                       r"'backbone/layer1_2/bn1/bias' \(80 of the 180 "):
    from_torchvision.convert_state_dict('resnet34', sd)
  sd['layer1.0.conv1.weight'] = sd['layer1.0.conv1.weight'][:, :, :1, :1]
  with pytest.raises(ValueError, match=r"'layer1.0.conv1.weight' \(64, 64, 1, 1\) converts to "
                                       r'shape \(1, 1, 64, 64\), but segjax params '
                                       r"'backbone/layer1_0/conv1/kernel' has shape "
                                       r'\(3, 3, 64, 64\)'):
    from_torchvision.convert_state_dict('resnet18', sd)


def test_command_line_converts_and_rejects_bad_arch(tmp_path):
  torch.manual_seed(0)
  tv = _randomize(torchvision.models.resnet18(weights=None))
  pth = str(tmp_path / 'r18.pth')
  torch.save({'model': tv.state_dict()}, pth)  # torchvision references' checkpoint layout
  out = str(tmp_path / 'r18')
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  run = lambda *args: subprocess.run([sys.executable, '-m', 'segjax.convert', *args],
                                     capture_output=True, text=True, env=env, timeout=300)
  bad = run('--from=torchvision', '--arch=resnet19', f'--input={pth}', f'--output={out}')
  assert bad.returncode != 0 and "'resnet18'" in bad.stderr and 'resnet19' in bad.stderr
  good = run('--from=torchvision', '--arch=resnet18', f'--input={pth}', f'--output={out}')
  assert good.returncode == 0, good.stderr[-2000:]
  assert 'not converted: fc.bias, fc.weight' in good.stdout
  variables, metadata = checkpoint.load_variables(out)
  assert metadata['segjax_model'] == {'name': 'resnet18'}
  np.testing.assert_array_equal(variables['params']['backbone']['layer1_0']['conv1']['kernel'],
                                tv.layer1[0].conv1.weight.detach().numpy().transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(variables['batch_stats']['backbone']['bn1']['var'],
                                tv.bn1.running_var.numpy())
