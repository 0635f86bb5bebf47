"""torchvision state_dict -> segjax variables, for every architecture segjax mirrors.

    variables, report = convert_state_dict('resnet50', state_dict)   # numpy arrays in
    variables['params']['backbone']['layer1_0']['conv1']['kernel']      # HWIO

Each architecture names the segjax module its weights fit (`build_module`). The
conversion walks that module's variables (from `jax.eval_shape` of its `init`, so
nothing is allocated twice) and fetches each one from the state_dict by name
(`torch_keys`), converting the layout:

  conv weight       OIHW -> HWIO                     `w.transpose(2, 3, 1, 0)`
  transposed conv   [in, out, kh, kw] -> HWIO        `w.transpose(2, 3, 0, 1)`; segjax's
                    `layers.conv_transpose_torch` flips the kernel inside, so
                    PyTorch ConvTranspose2d weights import unflipped
  linear weight     [out, in] -> [in, out]           `w.T`
  VGG fc6           Linear 25088 -> 4096 = 7x7 conv   `w.reshape(4096, 512, 7, 7)` then HWIO
                    (torchvision flattens pool5 as C, H, W)
  VGG fc7           Linear -> 1x1 conv               `w.T[None, None]`
  box head fc6      Linear C*7*7 -> 1024             rows reordered from torch's (C, H, W)
                    flattening to segjax's NHWC (H, W, C)
  BatchNorm         weight/bias -> scale/bias; running_mean/var -> batch_stats mean/var.
                    segjax's BatchNorm already has torchvision's eps 1e-5 and momentum
                    (flax 0.9 == PyTorch 0.1, `layers.BN_MOMENTUM`); num_batches_tracked
                    has no segjax counterpart and is dropped.

A variable with no state_dict key, or a shape that differs, raises naming both;
state_dict entries nothing reads are returned in the report (torchvision's
ImageNet classifier `fc` / `classifier.6` for backbones). Reading a `.pth` file
(`read_state_dict`) is the only place torch is imported.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from segjax import models
from segjax.models import deeplab, resnet, vgg
from segjax.models.detection import mask_rcnn

_LEAF = {'kernel': 'weight', 'scale': 'weight', 'bias': 'bias',
         'mean': 'running_mean', 'var': 'running_var'}
# Buffers torchvision keeps that segjax has no use for.
_IGNORED_SUFFIXES = ('num_batches_tracked',)


@dataclasses.dataclass(frozen=True)
class Arch:
  """One convertible torchvision architecture.

  kind: 'backbone' (variables under 'backbone'), 'segmentation' or 'detection'.
  segjax_name: the segjax backbone / model registry name it converts to.
  backbone: the ResNet / VGG inside it.
  """
  kind: str
  segjax_name: str
  backbone: str


ARCHS = {
    'vgg16': Arch('backbone', 'vgg16', 'vgg16'),
    'vgg16_bn': Arch('backbone', 'vgg16_bn', 'vgg16_bn'),
    **{f'resnet{d}': Arch('backbone', f'resnet{d}', f'resnet{d}') for d in (18, 34, 50, 101, 152)},
    'fcn_resnet50': Arch('segmentation', 'fcn_resnet', 'resnet50'),
    'fcn_resnet101': Arch('segmentation', 'fcn_resnet', 'resnet101'),
    'deeplabv3_resnet50': Arch('segmentation', 'deeplab_v3', 'resnet50'),
    'deeplabv3_resnet101': Arch('segmentation', 'deeplab_v3', 'resnet101'),
    'fasterrcnn_resnet50_fpn': Arch('detection', 'faster_rcnn', 'resnet50'),
    'maskrcnn_resnet50_fpn': Arch('detection', 'mask_rcnn', 'resnet50'),
}


def check_arch(arch: str) -> Arch:
  if arch not in ARCHS:
    raise ValueError(f'--arch={arch!r} is not a convertible torchvision architecture; '
                     f'choose one of {sorted(ARCHS)}')
  return ARCHS[arch]


# ---------------------------------------------------------------------------
# Reading the .pth file (torch only here).


def read_state_dict(path: str) -> dict[str, np.ndarray]:
  """A torchvision `.pth` file -> {state_dict key: float32 numpy array}.

  Accepts a bare state_dict, a training checkpoint holding one under 'model' or
  'state_dict' (torchvision's references save {'model': ...}), and DistributedDataParallel's
  'module.' prefixes.
  """
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError('reading a .pth file needs PyTorch: pip install "segjax[convert]" '
                      '(or pip install torch)') from e
  loaded = torch.load(path, map_location='cpu', weights_only=True)
  if isinstance(loaded, dict):
    for key in ('model', 'state_dict'):
      if isinstance(loaded.get(key), dict):
        loaded = loaded[key]
        break
  if not isinstance(loaded, dict) or not loaded:
    raise ValueError(f'{path} holds no state_dict (got {type(loaded).__name__}); save one with '
                     'torch.save(model.state_dict(), path)')
  out = {}
  for key, value in loaded.items():
    if not hasattr(value, 'detach'):
      continue
    key = key[len('module.'):] if key.startswith('module.') else key
    out[key] = value.detach().cpu().numpy()
  return out


# ---------------------------------------------------------------------------
# The segjax module each architecture converts to.


def _num_classes(state_dict: dict[str, np.ndarray], key: str, arch: str) -> int:
  if key not in state_dict:
    raise ValueError(f'the state_dict has no {key!r}: is it really a {arch} checkpoint? '
                     f'Its first keys: {sorted(state_dict)[:5]}')
  return int(state_dict[key].shape[0])


def segjax_model_config(arch: str, state_dict: dict[str, np.ndarray]) -> ml_collections.ConfigDict:
  """`config.model` of the segjax model that `arch`'s weights fit (heads: from the state_dict).

  Backbones: a ConfigDict with only `name` (the backbone). Segmentation models:
  torchvision's settings (ResNet at output stride 8; aux head if the state_dict has
  one). Detection: `default_detection_model_config` (torchvision's defaults).
  """
  spec = check_arch(arch)
  if spec.kind == 'backbone':
    return ml_collections.ConfigDict({'name': spec.segjax_name})
  if spec.kind == 'segmentation':
    c = models.default_model_config(spec.segjax_name)
    c.backbone = spec.backbone
    c.output_stride = 8  # torchvision: replace_stride_with_dilation=[False, True, True]
    c.aux_loss = any(k.startswith('aux_classifier.') for k in state_dict)
    return c
  c = mask_rcnn.default_detection_model_config(spec.segjax_name)
  c.backbone = spec.backbone
  return c


def num_classes_of(arch: str, state_dict: dict[str, np.ndarray]) -> int | None:
  spec = check_arch(arch)
  if spec.kind == 'segmentation':
    return _num_classes(state_dict, 'classifier.4.weight', arch)
  if spec.kind == 'detection':
    return _num_classes(state_dict, 'roi_heads.box_predictor.cls_score.weight', arch)
  return None


def build_module(arch: str, state_dict: dict[str, np.ndarray]):
  """The segjax module (flax) whose variables `arch`'s state_dict fills."""
  spec = check_arch(arch)
  config = segjax_model_config(arch, state_dict)
  if spec.kind == 'backbone':
    kwargs = dict(fc_kernel_size=7) if spec.backbone.startswith('vgg') else {}
    return _BackboneOnly(models.BACKBONES[spec.backbone](**kwargs))
  num_classes = num_classes_of(arch, state_dict)
  if spec.kind == 'segmentation':
    return models.build_model(config, num_classes=num_classes)
  return mask_rcnn.build_detector(config, num_classes=num_classes)


class _BackboneOnly(flax.linen.Module):
  """Puts a backbone's variables under 'backbone', where FCN / DeepLab keep theirs."""
  backbone: flax.linen.Module

  def __call__(self, x, *, train: bool):
    return self.backbone(x, train=train)


def abstract_variables(module, kind: str) -> dict[str, Any]:
  """The module's variables as ShapeDtypeStructs (nothing allocated)."""
  size = 64 if kind != 'detection' else 128
  x = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
  return jax.eval_shape(lambda x: module.init({'params': jax.random.key(0)}, x, train=False), x)


# ---------------------------------------------------------------------------
# Names and layouts.

Candidate = tuple[str, Callable[[np.ndarray], np.ndarray]]


def _hwio(w: np.ndarray) -> np.ndarray:
  return w.transpose(2, 3, 1, 0)


def _transpose(w: np.ndarray) -> np.ndarray:
  return w.T


def _identity(w: np.ndarray) -> np.ndarray:
  return w


def _default_layout(leaf: str) -> Callable[[np.ndarray], np.ndarray]:
  """Conv kernels (4-d) -> HWIO, Dense kernels (2-d) -> [in, out], others as they are."""
  if leaf != 'kernel':
    return _identity
  return lambda w: _hwio(w) if w.ndim == 4 else _transpose(w)


def _vgg_keys(arch: str, path: str) -> list[Candidate]:
  parts = path.split('/')
  module, leaf = '/'.join(parts[:-1]), parts[-1]
  prefix = vgg.torchvision_names(16, arch == 'vgg16_bn')[module]
  key = f'{prefix}.{_LEAF[leaf]}'
  if module == 'fc6' and leaf == 'kernel':
    # Linear [4096, 512 * 7 * 7] over pool5 flattened as (C, H, W) -> 7x7 conv.
    return [(key, lambda w: _hwio(w.reshape(w.shape[0], -1, 7, 7)))]
  if module == 'fc7' and leaf == 'kernel':
    return [(key, lambda w: w.T[None, None])]
  return [(key, _default_layout(leaf))]


def _box_fc6(w: np.ndarray) -> np.ndarray:
  """Linear [R, C*7*7] on (C, H, W)-flattened RoI features -> Dense [7*7*C, R] (NHWC)."""
  r = w.shape[0]
  c = w.shape[1] // 49
  return w.reshape(r, c, 7, 7).transpose(2, 3, 1, 0).reshape(49 * c, r)


def _detection_keys(path: str) -> list[Candidate]:
  """segjax Mask R-CNN path -> torchvision keys, the current name first, then the pre-0.13
  one (torchvision's COCO checkpoints still use the old names: its modules rename on load)."""
  parts = path.split('/')
  leaf = parts[-1]
  if parts[:2] == ['backbone', 'body']:
    return [('backbone.body.' + resnet.torchvision_name('/'.join(parts[2:])),
             _default_layout(leaf))]
  name = _LEAF.get(leaf)
  layout = _default_layout(leaf)
  module = '/'.join(parts[:-1])
  m = re.fullmatch(r'backbone/fpn/(inner_blocks|layer_blocks)_(\d+)', module)
  if m:
    base = f'backbone.fpn.{m[1]}.{m[2]}'
    return [(f'{base}.0.{name}', layout), (f'{base}.{name}', layout)]
  if module == 'rpn/head/conv':
    return [(f'rpn.head.conv.0.0.{name}', layout), (f'rpn.head.conv.{name}', layout)]
  m = re.fullmatch(r'roi_heads/mask_head/mask_fcn(\d)', module)
  if m:
    i = int(m[1])
    return [(f'roi_heads.mask_head.{i - 1}.0.{name}', layout),
            (f'roi_heads.mask_head.mask_fcn{i}.{name}', layout)]
  if path == 'roi_heads/mask_predictor/conv5_mask_kernel':
    # ConvTranspose2d weight [in, out, kh, kw]; conv_transpose_torch takes it unflipped.
    return [('roi_heads.mask_predictor.conv5_mask.weight', lambda w: w.transpose(2, 3, 0, 1))]
  if path == 'roi_heads/mask_predictor/conv5_mask_bias':
    return [('roi_heads.mask_predictor.conv5_mask.bias', _identity)]
  if path == 'roi_heads/box_head/fc6/kernel':
    return [('roi_heads.box_head.fc6.weight', _box_fc6)]
  return [('.'.join(parts[:-1]) + '.' + name, layout)]


def torch_keys(arch: str, path: str) -> list[Candidate]:
  """Candidate (state_dict key, layout function) pairs of segjax variable `path`
  ('params' / 'batch_stats' stripped; '/'-joined), in order of preference."""
  spec = check_arch(arch)
  if spec.kind == 'backbone':
    inner = path[len('backbone/'):]
    if spec.backbone.startswith('vgg'):
      return _vgg_keys(arch, inner)
    return [(resnet.torchvision_name(inner), _default_layout(path.split('/')[-1]))]
  if spec.kind == 'segmentation':
    return [(deeplab.torchvision_name(path), _default_layout(path.split('/')[-1]))]
  return _detection_keys(path)


# ---------------------------------------------------------------------------
# The conversion.


@dataclasses.dataclass
class Report:
  """What a conversion read: `used` state_dict keys, `unused` ones (not ignorable)."""
  used: list[str]
  unused: list[str]


def convert_state_dict(arch: str, state_dict: dict[str, np.ndarray]
                       ) -> tuple[dict[str, Any], Report]:
  """torchvision `state_dict` (numpy arrays) of `arch` -> (segjax variables, report).

  Raises ValueError naming the segjax variable and the state_dict key on a missing
  key or a shape mismatch.
  """
  spec = check_arch(arch)
  module = build_module(arch, state_dict)
  shapes = abstract_variables(module, spec.kind)
  variables = {}
  used = set()
  flats = {c: flax.traverse_util.flatten_dict(flax.core.unfreeze(t), sep='/')
           for c, t in sorted(shapes.items(), key=lambda item: item[0] != 'params')}
  missing = [(c, path, torch_keys(arch, path)[0][0]) for c, flat in flats.items()
             for path in flat if not any(k in state_dict for k, _ in torch_keys(arch, path))]
  if missing:
    collection, path, key = missing[0]
    raise ValueError(f'{arch}: the state_dict has no {key!r} for segjax {collection} {path!r} '
                     f'({len(missing)} of the {sum(map(len, flats.values()))} variables have '
                     f'no key); is the file a {arch} checkpoint?')
  for collection, flat in flats.items():
    converted = {}
    for path, struct in flat.items():
      key, layout = next((k, f) for k, f in torch_keys(arch, path) if k in state_dict)
      value = np.asarray(layout(np.asarray(state_dict[key], np.float32)), np.float32)
      if value.shape != tuple(struct.shape):
        raise ValueError(f'{arch}: {key!r} {tuple(state_dict[key].shape)} converts to shape '
                         f'{value.shape}, but segjax {collection} {path!r} has shape '
                         f'{tuple(struct.shape)}')
      converted[path] = np.ascontiguousarray(value)
      used.add(key)
    variables[collection] = flax.traverse_util.unflatten_dict(converted, sep='/')
  unused = sorted(k for k in state_dict
                  if k not in used and not k.endswith(_IGNORED_SUFFIXES))
  return variables, Report(sorted(used), unused)


def convert_file(arch: str, input_path: str, output_dir: str) -> tuple[str, Report]:
  """Reads a torchvision .pth, converts it, writes the segjax checkpoint; (path, report)."""
  from segjax.convert import checkpoint  # pylint: disable=g-import-not-at-top
  spec = check_arch(arch)
  state_dict = read_state_dict(input_path)
  variables, report = convert_state_dict(arch, state_dict)
  variables.setdefault('batch_stats', {})
  metadata = {'source': 'torchvision', 'arch': arch, 'input': input_path,
              'kind': spec.kind,
              'segjax_model': segjax_model_config(arch, state_dict).to_dict(),
              'num_classes': num_classes_of(arch, state_dict),
              'unused_keys': report.unused}
  path = checkpoint.save_variables(output_dir, variables, _jsonable(metadata))
  return path, report


def _jsonable(x: Any) -> Any:
  if isinstance(x, dict):
    return {k: _jsonable(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_jsonable(v) for v in x]
  return x
