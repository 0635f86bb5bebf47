"""The semantic trainer: builds everything from a config; `loop.run` trains, evaluates,
checkpoints and resumes.

Rerunning the same command with the same workdir resumes from the latest
checkpoint: step, parameters, optimizer, rng and the input iterator's position are
all restored, so the resumed run continues exactly where the saved one stood.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from segjax import config_validation, visualize
from segjax.data import pipeline
from segjax.evaluation.segmentation_metrics import metrics_from_confusion
from segjax.models import build_model
from segjax.train import init_from, loop, loss_scale, optimizers, parallel, steps
from segjax.train.state import TrainState, create_train_state

def create_state(config) -> TrainState:
  """The initial TrainState of `config` (host arrays, before any driver placement)."""
  model = build_model(config.model, num_classes=config.dataset.num_classes,
                      bn_axis_name=parallel.bn_axis_name(config.parallel))
  tx = optimizers.build_optimizer(config.optimizer, config.num_train_steps)
  height, width = config.dataset.crop_size
  state = create_train_state(model, tx, jax.random.PRNGKey(config.seed), (1, height, width, 3))
  state = state.replace(loss_scale=loss_scale.initial(config))
  # Pretrained weights (segjax.convert); a resume then replaces every array (loop.run).
  return init_from.apply_to_state(state, config.init_from) if 'init_from' in config else state


def make_driver(config):
  learning_rate_fn = optimizers.learning_rate_schedule(config.optimizer, config.num_train_steps)
  train_step = steps.bind_train_step(config, axis_name=None, learning_rate_fn=learning_rate_fn)
  return parallel.make_driver(config.parallel, train_step, config.dataset.num_classes,
                              eval_step=steps.bind_eval_step(config))


def evaluate(driver, device_state, eval_loader, class_names=None) -> dict[str, float]:
  """Metrics over the whole eval split from one confusion matrix summed on device.

  The driver's eval step applies `config.eval` (test-time augmentation, dense CRF;
  see `steps.bind_eval_step`) before the argmax.
  """
  return metrics_from_confusion(evaluate_confusion(driver, device_state, eval_loader),
                                class_names)


def evaluate_confusion(driver, device_state, eval_loader) -> np.ndarray:
  """[C, C] confusion matrix (rows: ground truth) of the whole eval split."""
  confusion = None
  for batch in eval_loader:
    batch_confusion = driver.eval_step(device_state, batch)
    confusion = batch_confusion if confusion is None else confusion + batch_confusion
  if confusion is None:
    raise ValueError('the evaluation split yielded no batches')
  return np.asarray(jax.device_get(confusion))


def inference_state(driver, device_state) -> TrainState:
  """The parameters and BatchNorm statistics of a driver's state, on one device or
  replicated, ready for a plain `jax.jit` (no optimizer state)."""
  state = device_state.replace(opt_state=None)
  if isinstance(driver, parallel.PmapDriver):
    state = jax.tree_util.tree_map(lambda x: x[0], state)
  return state


def unnormalize(images: np.ndarray, mean, std) -> np.ndarray:
  """Normalised float images [..., 3] -> uint8 RGB (x * std + mean, the inverse of
  the pipeline's Normalize)."""
  rgb = np.asarray(images, np.float32) * np.asarray(std, np.float32) + np.asarray(mean,
                                                                                  np.float32)
  return np.clip(np.round(rgb), 0, 255).astype(np.uint8)


def example_panels(scores_fn, state, batch: dict[str, np.ndarray], num_images: int,
                   mean, std) -> np.ndarray:
  """Rows of image | ground truth | prediction for the first `num_images` real images of
  an eval `batch` (each cropped to its valid pixels), predicted by `scores_fn`
  (`steps.bind_predict_scores`: the evaluation's TTA and CRF included)."""
  real = np.flatnonzero(np.asarray(batch['valid']).any(axis=(1, 2)))[:num_images]
  images, valid = np.asarray(batch['image'])[real], np.asarray(batch['valid'])[real]
  predictions = np.asarray(jax.device_get(
      jnp.argmax(scores_fn(state, images, valid), axis=-1)))
  rows = []
  for image, label, prediction, mask in zip(images, np.asarray(batch['label'])[real],
                                            predictions, valid):
    h, w = int(mask.any(axis=1).sum()), int(mask.any(axis=0).sum())
    rows.append(visualize.semantic_panel(unnormalize(image[:h, :w], mean, std),
                                         label[:h, :w], prediction[:h, :w]))
  return visualize.panel_grid(rows, ('image', 'ground truth', 'prediction'))


def make_evaluate(config, driver, eval_loader, class_names):
  """device_state -> (metrics, TensorBoard images) of the eval split.

  Images (`config.eval.num_images` > 0, one JAX process): 'eval/examples', that many
  validation images with ground truth and prediction side by side, and
  'eval/confusion_matrix' (rows normalised: per-class recall).
  """
  num_images = int(config.eval.get('num_images', 0))
  scores_fn = jax.jit(steps.bind_predict_scores(config))
  first_batch = {}

  def run(device_state):
    confusion = evaluate_confusion(driver, device_state, eval_loader)
    metrics = metrics_from_confusion(confusion, class_names)
    if num_images <= 0 or jax.process_count() > 1:
      return metrics
    if not first_batch:
      first_batch.update(next(iter(eval_loader)))
    images = {
        'eval/examples': example_panels(scores_fn, inference_state(driver, device_state),
                                        first_batch, num_images, config.dataset.mean,
                                        config.dataset.std),
        'eval/confusion_matrix': visualize.confusion_matrix_image(confusion, class_names),
    }
    return metrics, images

  return run


def summarize(metrics: dict[str, float]) -> str:
  return ' '.join(f'{k}={metrics[k]:.4f}' for k in ('miou', 'pixel_accuracy', 'mean_accuracy'))


def train_and_evaluate(config, workdir: str) -> dict[str, Any]:
  """Trains `config` in `workdir` (resuming if it holds checkpoints); returns final eval metrics."""
  config_validation.validate_config(config)
  workdir = os.path.abspath(workdir)
  os.makedirs(workdir, exist_ok=True)
  class_names = config_validation.class_names(config)

  state = create_state(config)
  driver = make_driver(config)
  config_validation.validate_batch_split(config, driver.num_devices)
  train_loader = pipeline.create_train_loader(config.dataset, global_batch_size=config.batch_size,
                                              seed=config.seed)
  eval_loader = pipeline.create_eval_loader(config.dataset,
                                            global_batch_size=config.eval_batch_size)
  train_iter = iter(train_loader)

  return loop.run(
      config, workdir, state=state, driver=driver, train_iter=train_iter,
      evaluate=make_evaluate(config, driver, eval_loader, class_names),
      summarize=summarize, best_metric='miou')
