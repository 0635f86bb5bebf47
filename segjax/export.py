"""Export a trained model's inference function with `jax.export` (StableHLO), and load it.

  python -m segjax.export --config=configs/fcn8s.py --workdir=runs/fcn8s --output=model.bin
  python -m segjax.export --config=configs/mask_rcnn_r50_fpn.py --workdir=runs/mask_rcnn \
      --output=mask_rcnn.bin --platforms=cpu,tpu

  from segjax.export import load            # imports jax and numpy only, no segjax model code
  model = load('model.bin')
  out = model(images)                        # images [B, H, W, 3] RGB 0..255, any batch size B
  out['labels']                              # [B, H, W] int32 class ids

What is exported. One pure function `f(weights, images[, image_sizes]) -> outputs`,
jit-compiled and serialised as StableHLO by `jax.export`. It takes raw RGB pixels
(0..255, float32) and normalises them itself with the training config's mean/std, so
a user needs nothing from the config to call it.

- Semantic models: images [B, H, W, 3] -> {'logits': [B, H, W, C] float32 (or 'probs',
  the mean softmax, when the config's eval uses test-time augmentation or the dense
  CRF), 'labels': [B, H, W] int32 argmax}.
- Detectors (config.task == 'instance'): images [B, Hp, Wp, 3] padded bottom/right,
  image_sizes [B, 2] int32 (h, w) of each image inside its padding -> the model's
  padded detections: 'boxes' [B, D, 4] (x1, y1, x2, y2), 'scores', 'labels', 'valid'
  [B, D], 'mask_probs' [B, D, 28, 28] (Mask R-CNN), 'mask_scores' [B, D] (MS R-CNN).
  Pixels outside image_sizes are set to the normalised mean (0), as the training
  pipeline's padding is.

The batch dimension is symbolic (one artifact serves any B >= 1), for the detectors
too: every detection op keeps its per-image shapes static (`num_proposals`,
`detections_per_img`) and only maps over the batch. Height and width are NOT symbolic:
bilinear upsampling builds its interpolation matrices from the static size, FCN crops
its deconvolution outputs to it and the anchors are computed for it, so an artifact
is for one (H, W) — by default the config's `eval_pad_size` (semantic) or `pad_size`
(detection); `--image_size=H,W` picks another. Resize or pad images to it.

Weights are arguments, not constants baked into the StableHLO: the program stays small
(constant folding of hundreds of MB of weights is slow, and protobuf caps a module at
2 GB), and `load(path, weights=...)` can run other weights of the same architecture.
The file holds both, in this layout (all lengths little-endian uint64):

  b'SEGJAXEX'  | len, JSON header | len, jax.export serialised bytes | len, .npz of weights

The header names the weight arrays in argument order (their flax paths), the inputs,
the outputs, mean/std, class names and the config. `load` reads it with json, numpy
and `jax.export.deserialize` only, so it can be copied into a project without segjax.
The artifact runs on the platforms it was exported for (`--platforms`, default the
exporting machine's); exporting for several at once (e.g. cpu,tpu) needs no
accelerator.
"""

from __future__ import annotations

import io
import json
import struct
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ['DETECTION_OUTPUTS', 'MAGIC', 'export_model', 'inference_function', 'load',
           'load_parts', 'restore_variables', 'save']

MAGIC = b'SEGJAXEX'
FORMAT_VERSION = 1
# The detectors' exported outputs: the padded detections (what COCO evaluation reads).
DETECTION_OUTPUTS = ('boxes', 'scores', 'labels', 'valid', 'mask_probs', 'mask_scores')


# ----------------------------------------------------------------------------- loading
# Below this line only json, struct, io, numpy and jax: the loader needs no segjax code.

def load_parts(path: str) -> tuple[dict[str, Any], 'jax.export.Exported', list[np.ndarray]]:
  """(header, jax.export.Exported, weights in argument order) of an exported file."""
  with open(path, 'rb') as f:
    data = f.read()
  if data[:len(MAGIC)] != MAGIC:
    raise ValueError(f'{path!r} is not a segjax export (it does not start with {MAGIC!r})')
  offset, parts = len(MAGIC), []
  for _ in range(3):
    (length,) = struct.unpack_from('<Q', data, offset)
    offset += 8
    parts.append(data[offset:offset + length])
    offset += length
  header = json.loads(parts[0].decode('utf-8'))
  if header['format_version'] != FORMAT_VERSION:
    raise ValueError(f'{path!r} has format version {header["format_version"]}; this loader '
                     f'reads version {FORMAT_VERSION}')
  exported = jax.export.deserialize(bytearray(parts[1]))
  with np.load(io.BytesIO(parts[2]), allow_pickle=False) as npz:
    weights = [npz[f'w{i}'] for i in range(len(header['weights']))]
  return header, exported, weights


def load(path: str, weights: Sequence[np.ndarray] | None = None) -> Callable[..., dict]:
  """The exported inference function of `path` with its weights bound.

  Returns `fn(images[, image_sizes]) -> dict of arrays` (see the module docstring);
  images are RGB 0..255 of the exported (H, W), any batch size. `weights` replaces the
  stored ones (same shapes and order). `fn.header` is the file's metadata.
  """
  header, exported, stored = load_parts(path)
  bound = [jnp.asarray(w) for w in (stored if weights is None else weights)]
  input_names = [spec['name'] for spec in header['inputs']]

  def fn(*inputs):
    if len(inputs) != len(input_names):
      raise TypeError(f'expected inputs {input_names}, got {len(inputs)} argument(s)')
    args = [jnp.asarray(x, dtype=spec['dtype']) for x, spec in zip(inputs, header['inputs'])]
    return exported.call(bound, *args)

  fn.header = header
  fn.exported = exported
  return fn


# ----------------------------------------------------------------------------- exporting

def _flat_weights(variables: dict[str, Any]) -> tuple[list[str], list[np.ndarray]]:
  flat = jax.tree_util.tree_flatten_with_path(variables)[0]
  names = ['/'.join(str(getattr(k, 'key', k)) for k in path) for path, _ in flat]
  return names, [np.asarray(v) for _, v in flat]


def inference_function(config, model=None) -> Callable[..., dict[str, jax.Array]]:
  """The pure function that is exported: `(variables, images[, image_sizes]) -> outputs`.

  `variables` is {'params', 'batch_stats'} of `config`'s model; images are RGB 0..255.
  """
  # Imported here so that `load` above works without segjax's model code.
  from segjax.train import detection_trainer, steps  # pylint: disable=g-import-not-at-top
  from segjax.train.state import TrainState  # pylint: disable=g-import-not-at-top
  mean = jnp.asarray(config.dataset.mean, jnp.float32)
  std = jnp.asarray(config.dataset.std, jnp.float32)

  if detection_trainer.is_instance_config(config):
    from segjax.models.detection import mask_rcnn  # pylint: disable=g-import-not-at-top
    model = model or mask_rcnn.build_detector(config.model,
                                              num_classes=config.dataset.num_classes)

    def detect(variables, images, image_sizes):
      height, width = images.shape[1:3]
      inside = ((jnp.arange(height)[None, :, None] < image_sizes[:, 0, None, None])
                & (jnp.arange(width)[None, None, :] < image_sizes[:, 1, None, None]))
      x = jnp.where(inside[..., None], (images - mean) / std, 0.0)
      out = model.apply(variables, x, train=False, image_sizes=image_sizes)
      return {k: v for k, v in out.items() if k in DETECTION_OUTPUTS}
    return detect

  from segjax.models import build_model  # pylint: disable=g-import-not-at-top
  model = model or build_model(config.model, num_classes=config.dataset.num_classes)
  tta_scales = tuple(float(s) for s in config.eval.tta.scales)
  tta_flip = bool(config.eval.tta.flip)
  use_crf = bool(config.eval.crf.enabled)

  def segment(variables, images):
    x = (images - mean) / std
    if tta_scales == (1.0,) and not tta_flip and not use_crf:
      logits = model.apply(variables, x, train=False)['logits'].astype(jnp.float32)
      return {'logits': logits, 'labels': jnp.argmax(logits, axis=-1).astype(jnp.int32)}
    state = TrainState(step=None, params=variables['params'],
                       batch_stats=variables.get('batch_stats', {}), opt_state=None, rng=None,
                       apply_fn=model.apply, tx=None)
    probs = steps.predict_probs(state, x, scales=tta_scales, flip=tta_flip)
    if use_crf:
      unary = jnp.log(jnp.maximum(probs, jnp.finfo(jnp.float32).tiny))
      valid = jnp.ones(x.shape[:3], bool)
      probs = steps.refine_with_crf(config.eval.crf, unary, x, valid, config.dataset.mean,
                                    config.dataset.std)
    return {'probs': probs, 'labels': jnp.argmax(probs, axis=-1).astype(jnp.int32)}
  return segment


def export_model(config, variables: dict[str, Any], *, image_size: Sequence[int] | None = None,
                 batch_size: int | None = None,
                 platforms: Sequence[str] | None = None) -> tuple[dict, bytes, list[np.ndarray]]:
  """(header, serialised jax.export bytes, weights) of `config`'s model with `variables`.

  batch_size None exports a symbolic batch dimension; image_size None the config's
  eval size (semantic: dataset.eval_pad_size, detection: dataset.pad_size).
  """
  from segjax.train import detection_trainer  # pylint: disable=g-import-not-at-top
  detection = detection_trainer.is_instance_config(config)
  if image_size is None:
    image_size = config.dataset.pad_size if detection else config.dataset.eval_pad_size
  height, width = (int(s) for s in image_size)
  if height < 1 or width < 1:
    raise ValueError(f'image_size={tuple(image_size)!r} must be two positive integers')
  if batch_size is not None and (isinstance(batch_size, bool) or int(batch_size) < 1):
    raise ValueError(f'batch_size={batch_size!r} must be None (symbolic) or an integer >= 1')
  variables = {'params': variables['params'], 'batch_stats': variables.get('batch_stats', {})}
  names, weights = _flat_weights(variables)
  treedef = jax.tree_util.tree_structure(variables)
  fn = inference_function(config)

  def flat_fn(flat_weights, *inputs):
    return fn(jax.tree_util.tree_unflatten(treedef, list(flat_weights)), *inputs)

  batch = jax.export.symbolic_shape('b')[0] if batch_size is None else int(batch_size)
  weight_specs = [jax.ShapeDtypeStruct(w.shape, w.dtype) for w in weights]
  inputs = [('images', (batch, height, width, 3), 'float32')]
  if detection:
    inputs.append(('image_sizes', (batch, 2), 'int32'))
  input_specs = [jax.ShapeDtypeStruct(shape, dtype) for _, shape, dtype in inputs]
  exported = jax.export.export(jax.jit(flat_fn), platforms=platforms)(weight_specs, *input_specs)

  from segjax import config_validation  # pylint: disable=g-import-not-at-top
  header = {
      'format_version': FORMAT_VERSION,
      'task': 'instance' if detection else 'semantic',
      'model': config.model.name,
      'inputs': [{'name': n, 'shape': [s if isinstance(s, int) else str(s) for s in shape],
                  'dtype': d} for n, shape, d in inputs],
      'outputs': {name: {'shape': [d if isinstance(d, int) else str(d) for d in aval.shape],
                         'dtype': str(aval.dtype)}
                  for name, aval in zip(_output_names(exported), exported.out_avals)},
      'weights': names,
      'num_classes': int(config.dataset.num_classes),
      'class_names': (None if detection else config_validation.class_names(config)),
      'mean': [float(m) for m in config.dataset.mean],
      'std': [float(s) for s in config.dataset.std],
      'platforms': list(exported.platforms),
      'config': json.loads(config.to_json_best_effort()),
  }
  return header, bytes(exported.serialize()), weights


def _output_names(exported) -> list[str]:
  # The outputs are one flat dict; its keys in the pytree's (sorted) leaf order.
  return sorted(jax.tree_util.tree_unflatten(
      exported.out_tree, list(range(exported.out_tree.num_leaves))).keys())


def save(path: str, header: dict, serialized: bytes, weights: Sequence[np.ndarray]) -> int:
  """Writes the file layout of the module docstring; returns its size in bytes."""
  buffer = io.BytesIO()
  np.savez(buffer, **{f'w{i}': w for i, w in enumerate(weights)})
  parts = [json.dumps(header).encode('utf-8'), serialized, buffer.getvalue()]
  with open(path, 'wb') as f:
    f.write(MAGIC)
    for part in parts:
      f.write(struct.pack('<Q', len(part)))
      f.write(part)
  return len(MAGIC) + sum(8 + len(p) for p in parts)


def restore_variables(workdir: str, step: int | None = None) -> tuple[dict, int]:
  """({'params', 'batch_stats'}, step) of checkpoint `step` (default: latest) in workdir.

  Restored as saved, without building the model or optimizer for a template.
  """
  import os  # pylint: disable=g-import-not-at-top
  from segjax.train import checkpoints  # pylint: disable=g-import-not-at-top
  directory = os.path.join(os.path.abspath(workdir), 'checkpoints')
  if not os.path.isdir(directory):
    raise FileNotFoundError(f'--workdir={workdir!r} has no checkpoints/ directory; train '
                            'there first (python -m segjax.main --workdir=...)')
  checkpointer = checkpoints.Checkpointer(directory, async_save=False)
  try:
    state, step = checkpointer.restore_arrays(step)
  finally:
    checkpointer.close()
  return {'params': state['params'], 'batch_stats': state.get('batch_stats') or {}}, step


def main(argv):
  from absl import app, logging  # pylint: disable=g-import-not-at-top
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  config = _CONFIG.value
  try:
    image_size = _parse_pair(_IMAGE_SIZE.value) if _IMAGE_SIZE.value else None
    variables, step = restore_variables(_WORKDIR.value, _STEP.value)
  except (FileNotFoundError, ValueError) as error:  # a user's bad flag: one line, no trace
    raise SystemExit(f'error: {error}') from error
  platforms = tuple(p.strip() for p in _PLATFORMS.value.split(',')) if _PLATFORMS.value else None
  header, serialized, weights = export_model(config, variables, image_size=image_size,
                                             batch_size=_BATCH_SIZE.value, platforms=platforms)
  header['step'] = step
  size = save(_OUTPUT.value, header, serialized, weights)
  logging.info('exported %s (step %d) to %s: %.2f MB (StableHLO %.2f MB, %d weight arrays); '
               'inputs %s; platforms %s', config.model.name, step, _OUTPUT.value, size / 1e6,
               len(serialized) / 1e6, len(weights),
               ', '.join(f'{i["name"]} {i["shape"]}' for i in header['inputs']),
               header['platforms'])


def _parse_pair(text: str) -> tuple[int, int]:
  try:
    height, width = (int(v) for v in text.split(','))
  except ValueError as error:
    raise ValueError(f'--image_size={text!r} must be H,W (two integers)') from error
  return height, width


if __name__ == '__main__':
  from absl import app, flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  _CONFIG = config_flags.DEFINE_config_file('config', None, 'Config file (path[:preset]).',
                                            lock_config=True)
  _WORKDIR = flags.DEFINE_string('workdir', None, 'Training workdir (holds checkpoints/).')
  _OUTPUT = flags.DEFINE_string('output', None, 'File to write, e.g. model.bin.')
  _STEP = flags.DEFINE_integer('step', None, 'Checkpoint step (default: the latest).')
  _IMAGE_SIZE = flags.DEFINE_string('image_size', None,
                                    'H,W of the exported input (default: the eval size).')
  _BATCH_SIZE = flags.DEFINE_integer('batch_size', None,
                                     'Static batch size (default: symbolic, any batch).')
  _PLATFORMS = flags.DEFINE_string('platforms', None,
                                   "Comma-separated, e.g. 'cpu,cuda,tpu' (default: this "
                                   "machine's).")
  flags.mark_flags_as_required(['config', 'workdir', 'output'])
  app.run(main)
