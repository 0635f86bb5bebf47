"""Predicts segmentations of image files with a trained model and draws them.

  python -m segjax.predict --config=configs/fcn8s.py --workdir=runs/fcn8s \
      --input='photos/*.jpg' --output=/tmp/pred
  python -m segjax.predict --config=configs/mask_rcnn_r50_fpn.py \
      --checkpoint=runs/mask_rcnn/checkpoints --input=photos/ --output=/tmp/pred

--input: an image file, a directory (its image files, not recursive) or a glob
pattern. Grayscale, palette, RGBA (alpha dropped) and 16-bit images are converted to
8-bit RGB first. --checkpoint: a checkpoints directory (the latest step is used) or
one step's directory inside it; --workdir=RUN means RUN/checkpoints.

Semantic models (FCN, DeepLab) write per image NAME_label.png (palette PNG, VOC
colours, pixel value = class index) and NAME_overlay.png (classes tinted on the
image), both at the input's size. Each image is padded (bottom/right, with the
dataset mean, i.e. 0 after normalisation) to a multiple of 32 at least
`dataset.eval_pad_size`, run at its own scale (fully convolutional), and the scores
cropped back; `config.eval.tta` and `config.eval.crf` apply as in evaluation
(`steps.predict_scores`).

Instance models (Faster / Mask / Mask Scoring R-CNN) write NAME_overlay.png (masks,
boxes, class names and scores of detections >= --score_threshold) and, for all
detections, OUTDIR/results.json in the COCO results format (image_id, category_id =
model label, bbox [x, y, w, h] pixels of the input, score, RLE segmentation) with
OUTDIR/images.json mapping image_id to file_name, height and width. Images are
resized as in training (`dataset.min_size` / `max_size`), padded to
`dataset.pad_size`, and detections mapped back to the input's pixels
(`coco_eval.detections_to_coco`).
"""

from __future__ import annotations

# Before the heavy imports: the command line may restart itself with glibc's malloc set to
# keep freed memory (--host_malloc, segjax/train/host_memory.py).
import sys

from segjax.train import host_memory  # no JAX import: the restart comes first

if __name__ == '__main__':
  host_memory.configure_from_argv(sys.argv)

import dataclasses
import glob
import json
import os
from collections.abc import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags
from PIL import Image, UnidentifiedImageError

from segjax import config_validation, visualize
from segjax.data import instance_pipeline, sources, transforms
from segjax.evaluation import coco_eval
from segjax.train import checkpoints, detection_trainer, steps, trainer

IMAGE_EXTENSIONS = ('.png', '.jpg', '.jpeg', '.bmp', '.gif', '.tif', '.tiff', '.webp')
# Semantic inputs are padded to a multiple of this: the largest output stride of the
# backbones (ResNet / VGG at stride 32), so every feature map has a whole size.
PAD_MULTIPLE = 32


class PredictError(ValueError):
  """A user-caused problem (input, checkpoint) with a message naming the path or value."""


# ---------------------------------------------------------------------------
# Inputs.

def find_images(pattern: str) -> list[str]:
  """Image paths of `pattern`: a file, a directory (its image files) or a glob, sorted."""
  if os.path.isdir(pattern):
    paths = [os.path.join(pattern, name) for name in sorted(os.listdir(pattern))
             if name.lower().endswith(IMAGE_EXTENSIONS)]
    if not paths:
      raise PredictError(f'--input={pattern!r} is a directory without image files '
                         f'({", ".join(IMAGE_EXTENSIONS)})')
    return paths
  if os.path.isfile(pattern):
    return [pattern]
  paths = sorted(p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p))
  if not paths:
    raise PredictError(f'--input={pattern!r} matches no file (give an image, a directory or a '
                       'glob pattern such as "photos/*.jpg")')
  return paths


def load_rgb(path: str) -> np.ndarray:
  """uint8 RGB [H, W, 3] of an image file of any PIL mode.

  Grayscale and palette images become RGB; RGBA / LA lose their alpha; 16-bit and
  32-bit integer images are scaled to 8 bits by their type's range (16-bit: / 257).
  """
  try:
    with Image.open(path) as image:
      image.load()
  except (UnidentifiedImageError, OSError, ValueError) as error:
    raise PredictError(f'cannot read image {path!r}: {error}') from None
  if image.mode in ('I;16', 'I;16B', 'I;16L', 'I', 'F'):
    array = np.asarray(image)
    if image.mode.startswith('I;16') or (array.dtype != np.float32 and array.max() > 255):
      top = 65535.0 if image.mode.startswith('I;16') or array.max() <= 65535 else 2.0**31 - 1
      array = array.astype(np.float64) * (255.0 / top)
    array = np.clip(np.round(array), 0, 255).astype(np.uint8)
    image = Image.fromarray(array, mode='L')
  rgb = np.asarray(image.convert('RGB'))
  if rgb.ndim != 3 or rgb.shape[-1] != 3 or min(rgb.shape[:2]) < 1:
    raise PredictError(f'image {path!r} has unusable shape {rgb.shape}')
  return rgb


def image_size(path: str) -> tuple[int, int]:
  """(H, W) of an image file from its header."""
  try:
    with Image.open(path) as image:
      width, height = image.size
  except (UnidentifiedImageError, OSError, ValueError) as error:
    raise PredictError(f'cannot read image {path!r}: {error}') from None
  return height, width


def output_names(paths: Sequence[str]) -> list[str]:
  """A distinct file-name stem per input (the stem, '_2', '_3'... on repeats)."""
  seen: dict[str, int] = {}
  names = []
  for path in paths:
    stem = os.path.splitext(os.path.basename(path))[0]
    seen[stem] = seen.get(stem, 0) + 1
    names.append(stem if seen[stem] == 1 else f'{stem}_{seen[stem]}')
  return names


# ---------------------------------------------------------------------------
# Checkpoints.

def checkpoint_location(workdir: str | None, checkpoint: str | None) -> tuple[str, int | None]:
  """(Orbax checkpoints directory, step or None for the latest) from --workdir/--checkpoint."""
  if (workdir is None) == (checkpoint is None):
    raise PredictError('give exactly one of --workdir=RUN (uses RUN/checkpoints) or '
                       '--checkpoint=DIR')
  if workdir is not None:
    if not os.path.isdir(workdir):
      raise PredictError(f'--workdir={workdir!r} is not a directory')
    directory, step = os.path.join(workdir, 'checkpoints'), None
    what = f'--workdir={workdir!r}'
  else:
    directory, step = checkpoint.rstrip(os.sep) or checkpoint, None
    what = f'--checkpoint={checkpoint!r}'
    base = os.path.basename(directory)
    if base.isdigit() and os.path.isdir(os.path.join(directory, 'state')):
      directory, step = os.path.dirname(directory) or '.', int(base)
  directory = os.path.abspath(directory)
  steps_found = [n for n in os.listdir(directory) if n.isdigit()] if os.path.isdir(
      directory) else []
  if not steps_found:
    raise PredictError(f'{what}: no checkpoint in {directory!r} (expected step directories '
                       'written by `python -m segjax.main`)')
  return directory, step


def restore_state(config, directory: str, step: int | None):
  """The TrainState of `config` restored from an Orbax checkpoint directory."""
  instance = detection_trainer.is_instance_config(config)
  template = (detection_trainer.create_state(config) if instance
              else trainer.create_state(config))
  best_metric = 'bbox_AP' if instance else 'miou'
  checkpointer = checkpoints.Checkpointer(directory, best_metric=best_metric, async_save=False)
  try:
    state, _ = checkpointer.restore(template, step)
  except (ValueError, KeyError, FileNotFoundError) as error:
    raise PredictError(f'cannot restore {directory!r} (step {step or "latest"}) into '
                       f'{config.model.name}: {error}') from None
  finally:
    checkpointer.close()
  return state


# ---------------------------------------------------------------------------
# Semantic models.

def padded_size(height: int, width: int, min_size: Sequence[int]) -> tuple[int, int]:
  """The static size an image is padded to: >= min_size, a multiple of PAD_MULTIPLE."""
  def up(n, low):
    return max(int(low), -(-n // PAD_MULTIPLE) * PAD_MULTIPLE)
  return up(height, min_size[0]), up(width, min_size[1])


def semantic_inputs(image: np.ndarray, size: tuple[int, int], dataset) -> dict[str, np.ndarray]:
  """The evaluation pipeline's padding and normalisation of one uint8 image ->
  {'image': float32 [Hp, Wp, 3], 'valid': bool [Hp, Wp]}."""
  element = {'image': image, 'label': np.zeros(image.shape[:2], np.int32)}
  element = transforms.PadToSize(size, dataset.mean, dataset.ignore_label).map(element)
  element = transforms.Normalize(dataset.mean, dataset.std).map(element)
  return {'image': element['image'], 'valid': element['valid']}


class SemanticPredictor:
  """uint8 images of any size -> int32 label maps of the same size (argmax of
  `steps.predict_scores`: logits, or TTA-averaged / CRF-refined probabilities)."""

  def __init__(self, config, state, batch_size: int):
    self.dataset = config.dataset
    self.state = state
    self.batch_size = batch_size
    scores = steps.bind_predict_scores(config)
    self._labels = jax.jit(lambda s, x, v: jnp.argmax(scores(s, x, v), axis=-1))

  def __call__(self, images: Sequence[np.ndarray]) -> list[np.ndarray]:
    """At most `batch_size` images of one padded size (see `padded_size`)."""
    sizes = {padded_size(*im.shape[:2], self.dataset.eval_pad_size) for im in images}
    if len(sizes) != 1 or len(images) > self.batch_size:
      raise ValueError(f'a batch must hold <= {self.batch_size} images of one padded size, '
                       f'got {len(images)} of sizes {sorted(sizes)}')
    size = sizes.pop()
    inputs = [semantic_inputs(im, size, self.dataset) for im in images]
    # Whole batches: one compiled shape per padded size.
    inputs += [{'image': np.zeros(size + (3,), np.float32), 'valid': np.zeros(size, bool)}
               ] * (self.batch_size - len(images))
    labels = np.asarray(self._labels(self.state, np.stack([x['image'] for x in inputs]),
                                     np.stack([x['valid'] for x in inputs])))
    return [label[:im.shape[0], :im.shape[1]].astype(np.int32)
            for label, im in zip(labels, images)]


# ---------------------------------------------------------------------------
# Instance models.

def instance_inputs(image: np.ndarray, dataset, image_id: int) -> dict[str, np.ndarray]:
  """The instance evaluation pipeline (resize, pad to `pad_size`, normalise) of one image."""
  height, width = image.shape[:2]
  element = {'image': image, 'boxes': np.zeros((0, 4), np.float32),
             'labels': np.zeros((0,), np.int32), 'masks': np.zeros((0, height, width), np.uint8),
             'image_id': np.int64(image_id)}
  element = instance_pipeline.ResizeInstances(dataset.min_size, dataset.max_size).map(element)
  element = instance_pipeline.PadInstances(dataset.pad_size, 1, dataset.mean).map(element)
  element = transforms.Normalize(dataset.mean, dataset.std).map(element)
  return {k: element[k] for k in ('image', 'image_size', 'image_id', 'scale', 'orig_size')}


class InstancePredictor:
  """uint8 images -> COCO result dicts in each image's own pixels (`detections_to_coco`)."""

  def __init__(self, config, state, batch_size: int):
    self.dataset = config.dataset
    self.state = state
    self.batch_size = batch_size
    self.segm_score_key = detection_trainer.segm_score_key(config)
    self._predict = jax.jit(detection_trainer.predict)

  def __call__(self, images: Sequence[np.ndarray], image_ids: Sequence[int]) -> list[dict]:
    inputs = [instance_inputs(im, self.dataset, i) for im, i in zip(images, image_ids)]
    padding = instance_inputs(np.zeros((1, 1, 3), np.uint8), self.dataset, -1)
    inputs += [padding] * (self.batch_size - len(images))
    batch = {k: np.stack([x[k] for x in inputs]) for k in inputs[0]}
    outputs = jax.device_get(self._predict(self.state, {'image': batch['image'],
                                                        'image_size': batch['image_size']}))
    return coco_eval.detections_to_coco(outputs, batch, segm_score_key=self.segm_score_key)


# ---------------------------------------------------------------------------
# The whole run.

@dataclasses.dataclass
class PredictResult:
  """What `predict` wrote: one entry per input image, in input order."""
  images: list[str]
  label_paths: list[str | None]
  overlay_paths: list[str]
  results_path: str | None = None  # instance models: the COCO results JSON


def _batches(items: list, key, batch_size: int) -> Iterator[list]:
  """Consecutive groups of <= batch_size items with equal key(item), in key order."""
  groups: dict = {}
  for item in items:
    groups.setdefault(key(item), []).append(item)
  for _, group in sorted(groups.items()):
    for start in range(0, len(group), batch_size):
      yield group[start:start + batch_size]


def predict(config, *, input_pattern: str, output_dir: str, workdir: str | None = None,
            checkpoint: str | None = None, batch_size: int = 8,
            score_threshold: float = 0.5, state=None, progress: bool = True) -> PredictResult:
  """Predicts every image of `input_pattern` and writes the files of the module docstring.

  `state` (a restored TrainState) skips reading the checkpoint. Raises PredictError
  for a bad input, an unreadable image or a missing checkpoint.
  """
  from tqdm import tqdm  # pylint: disable=import-outside-toplevel

  if batch_size < 1:
    raise PredictError(f'--batch_size={batch_size} must be >= 1')
  instance = detection_trainer.is_instance_config(config)
  config_validation.validate_config(config)
  paths = find_images(input_pattern)
  if state is None:
    state = restore_state(config, *checkpoint_location(workdir, checkpoint))
  state = state.replace(opt_state=None)  # inference needs parameters and BN statistics only
  os.makedirs(output_dir, exist_ok=True)
  names = output_names(paths)
  class_names = sources.class_names(config.dataset.name)
  result = PredictResult(images=list(paths), label_paths=[None] * len(paths),
                         overlay_paths=[''] * len(paths))
  coco_results, coco_images = [], []
  if instance:
    model = InstancePredictor(config, state, batch_size)
    key = lambda i: 0  # every image is resized into the same pad_size
  else:
    model = SemanticPredictor(config, state, batch_size)
    size_of = {}
    key = lambda i: size_of[i]
    # Headers only: images are batched by padded size, then decoded batch by batch.
    for i, path in enumerate(paths):
      size_of[i] = padded_size(*image_size(path), config.dataset.eval_pad_size)
  with tqdm(total=len(paths), unit='img', disable=not progress, desc='predict') as bar:
    for group in _batches(list(range(len(paths))), key, batch_size):
      images = [load_rgb(paths[i]) for i in group]
      if instance:
        detections = model(images, [i + 1 for i in group])
        for i, image in zip(group, images):
          own = [d for d in detections if d['image_id'] == i + 1]
          coco_results += own
          coco_images.append({'id': i + 1, 'file_name': paths[i], 'height': image.shape[0],
                              'width': image.shape[1]})
          shown = [d for d in own if d['score'] >= score_threshold]
          drawn = visualize.draw_instances(
              image, **_drawable(detection_trainer.instances_from_coco(shown, image.shape[:2])),
              class_names=class_names)
          result.overlay_paths[i] = _save(drawn, output_dir, f'{names[i]}_overlay.png')
      else:
        for i, image, label in zip(group, images, model(images)):
          label_path = os.path.join(output_dir, f'{names[i]}_label.png')
          visualize.label_image(label).save(label_path)
          result.label_paths[i] = label_path
          drawn = visualize.overlay(image, label, ignore_label=None)
          result.overlay_paths[i] = _save(drawn, output_dir, f'{names[i]}_overlay.png')
      bar.update(len(group))
  if instance:
    result.results_path = os.path.join(output_dir, 'results.json')
    with open(result.results_path, 'w') as f:
      json.dump(sorted(coco_results, key=lambda r: r['image_id']), f)
    with open(os.path.join(output_dir, 'images.json'), 'w') as f:
      json.dump(sorted(coco_images, key=lambda r: r['id']), f, indent=1)
  return result


def _drawable(instances: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  return {'boxes': instances['boxes'], 'labels': instances['labels'],
          'scores': instances['scores'], 'masks': instances.get('masks')}


def _save(image: np.ndarray, output_dir: str, name: str) -> str:
  path = os.path.join(output_dir, name)
  Image.fromarray(image).save(path)
  return path


# ---------------------------------------------------------------------------
# Command line.



def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  logging.set_verbosity(logging.WARNING)
  try:
    result = predict(_CONFIG.value, input_pattern=_INPUT.value, output_dir=_OUTPUT.value,
                     workdir=_WORKDIR.value, checkpoint=_CHECKPOINT.value,
                     batch_size=_BATCH_SIZE.value, score_threshold=_SCORE_THRESHOLD.value)
  except PredictError as error:
    raise SystemExit(f'error: {error}') from None
  written = f'{len(result.images)} image(s) -> {_OUTPUT.value}'
  if result.results_path:
    written += f' (COCO results: {result.results_path})'
  print(written)


if __name__ == '__main__':
  # Flags exist only when this module is the program: importing it next to another
  # segjax command line (tests do) must not define the same absl flag twice.
  _CONFIG = config_flags.DEFINE_config_file('config', None, 'Config file (path[:preset]) of the '
                                            'trained model.', lock_config=True)
  _WORKDIR = flags.DEFINE_string('workdir', None, 'Run directory: its checkpoints/ is used.')
  _CHECKPOINT = flags.DEFINE_string('checkpoint', None, 'Orbax checkpoints directory (latest '
                                    'step) or one step directory; instead of --workdir.')
  _INPUT = flags.DEFINE_string('input', None, 'Image file, directory or glob pattern.')
  _OUTPUT = flags.DEFINE_string('output', None, 'Directory for the PNGs (and results.json).')
  _BATCH_SIZE = flags.DEFINE_integer('batch_size', 8, 'Images per compiled batch.')
  _SCORE_THRESHOLD = flags.DEFINE_float('score_threshold', 0.5, 'Instance models: detections '
                                        'drawn on the overlays (results.json keeps all).')
  _HOST_MALLOC = flags.DEFINE_enum('host_malloc', 'auto', host_memory.MODES,
                                   host_memory.FLAG_HELP)
  flags.mark_flags_as_required(['config', 'input', 'output'])
  app.run(main)
