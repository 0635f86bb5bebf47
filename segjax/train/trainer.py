"""The training loop: build everything from a config, train, evaluate, checkpoint, resume.

Rerunning the same command with the same workdir resumes from the latest
checkpoint: step, parameters, optimizer, rng and the input iterator's position are
all restored, so the resumed run continues exactly where the saved one stood.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import jax
import numpy as np
from absl import logging

from segjax import config_validation
from segjax.data import pipeline
from segjax.evaluation.segmentation_metrics import metrics_from_confusion
from segjax.models import build_model
from segjax.train import checkpoints, metric_writer, optimizers, parallel, steps
from segjax.train.state import TrainState, create_train_state

# Fetch step metrics at least this often: many multi-device steps queued without a
# sync can abort XLA:CPU with a rendezvous timeout (DESIGN.md, sharp edges).
_MAX_STEPS_IN_FLIGHT = 8


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


def _drop_records_after(path: str, step: int) -> None:
  """On resume, forget metrics logged after the checkpoint, which will be recomputed."""
  if not os.path.exists(path):
    return
  with open(path) as f:
    lines = [line for line in f if line.strip() and json.loads(line)['step'] <= step]
  with open(path, 'w') as f:
    f.writelines(lines)


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

  checkpointer = checkpoints.Checkpointer(
      os.path.join(workdir, 'checkpoints'), keep=config.keep_checkpoints,
      keep_best=config.keep_best_checkpoints)
  writer = metric_writer.MetricWriter(workdir)
  if checkpointer.latest_step() is not None:
    state, data_state = checkpointer.restore(state)
    train_iter.set_state(data_state)
    logging.info('Resumed from %s at step %d.', checkpointer.directory, int(state.step))
    if writer.enabled:
      _drop_records_after(writer.path, int(state.step))
  else:
    num_params = sum(x.size for x in jax.tree_util.tree_leaves(state.params))
    logging.info('Starting %s/%s from scratch: %d parameters, %d device(s), parallel=%s.',
                 config.model.name, config.model.backbone, num_params, driver.num_devices,
                 config.parallel)
    with open(os.path.join(workdir, 'config.json'), 'w') as f:
      f.write(config.to_json_best_effort(indent=2))

  device_state = driver.put_state(state)
  step = int(state.step)
  pending: list[dict[str, Any]] = []
  window_start, window_steps = time.perf_counter(), 0
  eval_metrics: dict[str, float] | None = None
  while step < config.num_train_steps:
    batch = next(train_iter)
    device_state, metrics = driver.train_step(device_state, batch)
    step += 1
    window_steps += 1
    pending.append(metrics)
    is_last = step == config.num_train_steps
    if len(pending) >= _MAX_STEPS_IN_FLIGHT:
      jax.block_until_ready(pending[-1])
    if step % config.log_every_steps == 0 or is_last:
      fetched = jax.device_get(pending)
      pending = []
      mean_metrics = {k: float(np.mean([m[k] for m in fetched])) for k in fetched[0]}
      elapsed = time.perf_counter() - window_start
      steps_per_second = window_steps / elapsed
      images_per_second = steps_per_second * config.batch_size
      metric_writer.log_train(step, config.num_train_steps, mean_metrics, steps_per_second,
                              images_per_second)
      writer.write(step, 'train', {**mean_metrics, 'steps_per_second': steps_per_second,
                                   'images_per_second': images_per_second})

    eval_metrics = None
    if step % config.eval_every_steps == 0 or is_last:
      eval_start = time.perf_counter()
      eval_metrics = evaluate(driver, device_state, eval_loader, num_classes, class_names)
      logging.info('eval at step %d: miou=%.4f pixel_accuracy=%.4f mean_accuracy=%.4f (%.1fs)',
                   step, eval_metrics['miou'], eval_metrics['pixel_accuracy'],
                   eval_metrics['mean_accuracy'], time.perf_counter() - eval_start)
      writer.write(step, 'eval', eval_metrics)
    if step % config.checkpoint_every_steps == 0 or is_last or eval_metrics is not None:
      checkpointer.save(driver.get_state(device_state), train_iter.get_state(),
                        metrics=eval_metrics)
    if eval_metrics is not None or step % config.checkpoint_every_steps == 0:
      window_start, window_steps = time.perf_counter(), 0

  if eval_metrics is None:  # Resumed a finished run: report its final numbers again.
    eval_metrics = evaluate(driver, device_state, eval_loader, num_classes, class_names)
    logging.info('already trained to step %d; eval miou=%.4f', step, eval_metrics['miou'])
  checkpointer.wait()
  checkpointer.close()
  writer.close()
  return eval_metrics
