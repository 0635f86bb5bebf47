"""The step loop shared by the semantic and the detection trainers.

Both trainers build a state, a driver, an input iterator and an evaluation
function from their config, then hand them to `start_or_resume` and `train`:
log every `log_every_steps`, evaluate every `eval_every_steps` and at the end,
checkpoint every `checkpoint_every_steps`, after each evaluation and at the end.
Rerunning in the same workdir resumes from the latest checkpoint: step,
parameters, optimizer, rng and the input iterator's position.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from absl import logging

from segjax.train import checkpoints, metric_writer
from segjax.train.state import TrainState

# Fetch step metrics at least this often: many multi-device steps queued without a
# sync can abort XLA:CPU with a rendezvous timeout (DESIGN.md, sharp edges).
MAX_STEPS_IN_FLIGHT = 8


def drop_records_after(path: str, step: int) -> None:
  """On resume, forget metrics logged after the checkpoint, which will be recomputed."""
  if not os.path.exists(path):
    return
  with open(path) as f:
    lines = [line for line in f if line.strip() and json.loads(line)['step'] <= step]
  with open(path, 'w') as f:
    f.writelines(lines)


def start_or_resume(config, workdir: str, state: TrainState, train_iter,
                    checkpointer: checkpoints.Checkpointer, writer: metric_writer.MetricWriter,
                    num_devices: int) -> TrainState:
  """The latest checkpoint's state (and input position, set on `train_iter`), or `state`.

  A fresh start logs the model and writes WORKDIR/config.json.
  """
  if checkpointer.latest_step() is not None:
    state, data_state = checkpointer.restore(state)
    train_iter.set_state(data_state)
    logging.info('Resumed from %s at step %d.', checkpointer.directory, int(state.step))
    if writer.enabled:
      drop_records_after(writer.path, int(state.step))
    return state
  num_params = sum(x.size for x in jax.tree_util.tree_leaves(state.params))
  logging.info('Starting %s/%s from scratch: %d parameters, %d device(s), parallel=%s.',
               config.model.name, config.model.backbone, num_params, num_devices,
               config.parallel)
  with open(os.path.join(workdir, 'config.json'), 'w') as f:
    f.write(config.to_json_best_effort(indent=2))
  return state


def train(config, *, driver, device_state, start_step: int, train_iter,
          checkpointer: checkpoints.Checkpointer,
          writer: metric_writer.MetricWriter, evaluate: Callable[[Any], dict[str, float]],
          summarize: Callable[[dict[str, float]], str],
          rank_checkpoints: bool = False) -> dict[str, float]:
  """Trains from the state's step to `config.num_train_steps`; returns the final eval metrics.

  Args:
    start_step: the step `device_state` stands at.
    evaluate: device_state -> metrics of the whole eval split.
    summarize: metrics -> the short text logged after each evaluation.
    rank_checkpoints: give each evaluated checkpoint its metrics (the Checkpointer
      keeps the best by its `best_metric` as well as the latest).

  A run that is already finished is evaluated again (so a rerun with other
  evaluation settings, e.g. the dense CRF, reports them) without training.
  """
  step = start_step
  pending: list[dict[str, Any]] = []
  window_start, window_steps = time.perf_counter(), 0
  eval_metrics = None
  while step < config.num_train_steps:
    batch = next(train_iter)
    device_state, metrics = driver.train_step(device_state, batch)
    step += 1
    window_steps += 1
    pending.append(metrics)
    is_last = step == config.num_train_steps
    if len(pending) >= MAX_STEPS_IN_FLIGHT:
      jax.block_until_ready(pending[-1])
    if step % config.log_every_steps == 0 or is_last:
      fetched = jax.device_get(pending)
      pending = []
      mean_metrics = {k: float(np.mean([m[k] for m in fetched])) for k in fetched[0]}
      steps_per_second = window_steps / (time.perf_counter() - window_start)
      images_per_second = steps_per_second * config.batch_size
      metric_writer.log_train(step, config.num_train_steps, mean_metrics, steps_per_second,
                              images_per_second)
      writer.write(step, 'train', {**mean_metrics, 'steps_per_second': steps_per_second,
                                   'images_per_second': images_per_second})
    eval_metrics = None
    if step % config.eval_every_steps == 0 or is_last:
      start = time.perf_counter()
      eval_metrics = evaluate(device_state)
      logging.info('eval at step %d (%.1fs): %s', step, time.perf_counter() - start,
                   summarize(eval_metrics))
      writer.write(step, 'eval', eval_metrics)
    if step % config.checkpoint_every_steps == 0 or is_last or eval_metrics is not None:
      checkpointer.save(driver.get_state(device_state), train_iter.get_state(),
                        metrics=eval_metrics if rank_checkpoints else None)
    if eval_metrics is not None or step % config.checkpoint_every_steps == 0:
      window_start, window_steps = time.perf_counter(), 0

  if eval_metrics is None:  # Resumed a finished run: report its final numbers again.
    start = time.perf_counter()
    eval_metrics = evaluate(device_state)
    logging.info('already trained to step %d; eval (%.1fs): %s', step,
                 time.perf_counter() - start, summarize(eval_metrics))
  return eval_metrics
