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
import numpy as np

from segjax import config_validation
from segjax.data import pipeline
from segjax.evaluation.segmentation_metrics import metrics_from_confusion
from segjax.models import build_model
from segjax.train import loop, optimizers, parallel, steps
from segjax.train.state import TrainState, create_train_state

def create_state(config) -> TrainState:
  """The initial TrainState of `config` (host arrays, before any driver placement)."""
  model = build_model(config.model, num_classes=config.dataset.num_classes,
                      bn_axis_name=parallel.bn_axis_name(config.parallel))
  tx = optimizers.build_optimizer(config.optimizer, config.num_train_steps)
  height, width = config.dataset.crop_size
  return create_train_state(model, tx, jax.random.PRNGKey(config.seed), (1, height, width, 3))


def make_driver(config):
  learning_rate_fn = optimizers.learning_rate_schedule(config.optimizer, config.num_train_steps)
  train_step = steps.bind_train_step(config, axis_name=None, learning_rate_fn=learning_rate_fn)
  return parallel.make_driver(config.parallel, train_step, config.dataset.num_classes,
                              eval_step=steps.bind_eval_step(config))


def evaluate(driver, device_state, eval_loader, num_classes: int,
             class_names=None) -> dict[str, float]:
  """Metrics over the whole eval split from one confusion matrix summed on device.

  The driver's eval step applies `config.eval` (test-time augmentation, dense CRF;
  see `steps.bind_eval_step`) before the argmax.
  """
  confusion = None
  for batch in eval_loader:
    batch_confusion = driver.eval_step(device_state, batch)
    confusion = batch_confusion if confusion is None else confusion + batch_confusion
  if confusion is None:
    raise ValueError('the evaluation split yielded no batches')
  return metrics_from_confusion(np.asarray(jax.device_get(confusion)), class_names)


def summarize(metrics: dict[str, float]) -> str:
  return ' '.join(f'{k}={metrics[k]:.4f}' for k in ('miou', 'pixel_accuracy', 'mean_accuracy'))


def train_and_evaluate(config, workdir: str) -> dict[str, Any]:
  """Trains `config` in `workdir` (resuming if it holds checkpoints); returns final eval metrics."""
  config_validation.validate_config(config)
  workdir = os.path.abspath(workdir)
  os.makedirs(workdir, exist_ok=True)
  num_classes = config.dataset.num_classes
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
      evaluate=lambda device_state: evaluate(driver, device_state, eval_loader, num_classes,
                                             class_names),
      summarize=summarize, best_metric='miou')
