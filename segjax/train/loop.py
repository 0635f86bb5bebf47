"""The step loop shared by the semantic and the detection trainers.

Both trainers build a state, a driver, an input iterator and an evaluation
function from their config, then hand them to `start_or_resume` and `train`:
log every `log_every_steps`, evaluate every `eval_every_steps` and at the end,
checkpoint every `checkpoint_every_steps`, after each evaluation and at the end.
Rerunning in the same workdir resumes from the latest checkpoint: step,
parameters, optimizer, rng and the input iterator's position.

SIGTERM (preemption) or SIGINT (Ctrl-C) during `train`: the current step
finishes, a checkpoint of it is written (and waited for), and `Interrupted` is
raised; `segjax.main` turns it into exit status 128 + signal number with a line
saying how to resume. A second signal of the same kind, or `kill -9`, stops the
process at once; rerunning resumes from the latest complete checkpoint.
With several JAX processes the signal may reach one host only: the processes share
their flags (`multihost_utils.process_allgather`) at the steps where the loop syncs
anyway (logging, checkpoints, every MAX_STEPS_IN_FLIGHT steps), so all of them save
the same step and stop, without a host round trip after every step.

Non-finite loss or gradients (`config.nonfinite`): the step never applies such an
update (`TrainState.apply_gradients_if_finite`), so no NaN reaches the state or a
checkpoint. 'skip' counts the skipped steps ('skipped_steps' in the train metrics,
a warning per step) and goes on; 'stop' raises `NonFiniteLoss` naming the first
bad step before anything after it is saved, so the latest checkpoint is the last
good state. The per-step flags are checked at least every MAX_STEPS_IN_FLIGHT steps
and before every checkpoint.

Host-to-device prefetch (`config.prefetch_to_device`, default 2): `DevicePrefetch`
keeps that many batches already put on the devices ahead of the step, so on an
accelerator the copy of the next batch overlaps the running step. The input
position saved with a checkpoint is the one after the last batch a step used,
not after the prefetched ones, so resuming is bit-identical with or without it.
"""

from __future__ import annotations

import collections
import contextlib
import json
import os
import signal
import threading
import time
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
import psutil
from absl import logging
from jax.experimental import multihost_utils

from segjax.models import layers
from segjax.train import checkpoints, metric_writer
from segjax.train.host_memory import release_free_heap
from segjax.train.state import TrainState

# Fetch step metrics at least this often: many multi-device steps queued without a
# sync can abort XLA:CPU with a rendezvous timeout (DESIGN.md, sharp edges).
MAX_STEPS_IN_FLIGHT = 8


_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
NONFINITE_POLICIES = ('stop', 'skip')


class Interrupted(Exception):
  """Training stopped by a signal after saving a checkpoint of `step`."""

  def __init__(self, signum: int, step: int):
    self.signum, self.step = signum, step
    super().__init__(f'{signal.Signals(signum).name} received: stopped after step {step} '
                     'and saved a checkpoint of it; rerun the same command to resume.')


def validate_nonfinite_policy(policy: Any) -> None:
  if policy not in NONFINITE_POLICIES:
    raise ValueError(f'config.nonfinite={policy!r} is not one of {NONFINITE_POLICIES}')


def validate_conv_weight_grad(impl: Any) -> None:
  if impl not in layers.CONV_WEIGHT_GRADS:
    raise ValueError(f'config.conv_weight_grad={impl!r} is not one of '
                     f'{layers.CONV_WEIGHT_GRADS}')


def validate_prefetch_to_device(depth: Any) -> None:
  if isinstance(depth, bool) or not isinstance(depth, int) or depth < 0:
    raise ValueError(f'config.prefetch_to_device={depth!r} must be an integer >= 0 '
                     '(batches put on the devices ahead of the step; 0: none ahead)')


class DevicePrefetch:
  """`iterator`'s batches, put on the devices by `put`, `depth` batches ahead of use.

  `put` (a driver's `put_batch`) starts an asynchronous copy, so a batch taken
  from here was on its way while the previous steps ran. `get_state()` is the
  wrapped iterator's state right after it yielded the last batch taken from
  here: what a checkpoint must record, since the `depth` batches in flight were
  never used. The wrapped iterator itself stands `depth` batches further on.
  """

  def __init__(self, iterator, put: Callable[[Any], Any], depth: int):
    validate_prefetch_to_device(depth)
    self._iterator, self._put, self._depth = iterator, put, depth
    self._queue: collections.deque = collections.deque()
    self._state = iterator.get_state()

  def __iter__(self):
    return self

  def __next__(self):
    while len(self._queue) <= self._depth:
      try:
        batch = next(self._iterator)
      except StopIteration:
        break
      self._queue.append((self._put(batch), self._iterator.get_state()))
    if not self._queue:
      raise StopIteration
    batch, self._state = self._queue.popleft()
    return batch

  def get_state(self):
    return self._state


class NonFiniteLoss(Exception):
  """The loss or a gradient of `step` was NaN or infinite (config.nonfinite='stop')."""

  def __init__(self, step: int, last_checkpoint: int | None, directory: str):
    self.step = step
    saved = (f'the latest checkpoint (step {last_checkpoint} in {directory}) holds the last '
             'good parameters' if last_checkpoint is not None else 'no checkpoint was saved yet')
    super().__init__(
        f'non-finite loss or gradients at step {step}: its update was not applied and '
        f"training stopped (config.nonfinite='stop'); {saved}. Rerunning resumes there and "
        'meets the same batch: lower optimizer.learning_rate, set optimizer.grad_clip_norm, '
        "or pass --config.nonfinite=skip to skip such steps.")


@contextlib.contextmanager
def _stop_requests():
  """Yields a list that receives the number of the first SIGTERM / SIGINT that arrives.

  The first signal only records itself (the loop stops at the end of its step);
  a second one gets the previous handler (SIGINT: KeyboardInterrupt). Off the main
  thread, where Python cannot install handlers, nothing is caught.
  """
  received: list[int] = []
  if threading.current_thread() is not threading.main_thread():
    yield received
    return
  previous = {signum: signal.getsignal(signum) for signum in _STOP_SIGNALS}

  def handler(signum, frame):
    if received:
      signal.signal(signum, previous[signum])
      signal.raise_signal(signum)
      return
    logging.warning('%s received: stopping after this step and saving a checkpoint.',
                    signal.Signals(signum).name)
    received.append(signum)

  for signum in _STOP_SIGNALS:
    signal.signal(signum, handler)
  try:
    yield received
  finally:
    for signum, old in previous.items():
      signal.signal(signum, old)


def _agreed_stop(stop: list[int], step: int, config) -> list[int]:
  """The signals received by any process (every process gets the same list); with
  several processes, asked only at steps where the loop syncs anyway."""
  if jax.process_count() == 1:
    return stop
  if all(step % every for every in (MAX_STEPS_IN_FLIGHT, config.log_every_steps,
                                    config.checkpoint_every_steps)):
    return []
  signums = multihost_utils.process_allgather(np.int32(stop[0] if stop else 0))
  return [int(signum) for signum in np.ravel(signums) if signum]


def drop_records_after(path: str, step: int) -> None:
  """On resume, forget metrics logged after the checkpoint, which will be recomputed."""
  if not os.path.exists(path):
    return
  with open(path) as f:
    lines = [line for line in f if line.strip() and json.loads(line)['step'] <= step]
  with open(path, 'w') as f:
    f.writelines(lines)


def check_input_workers(data_state, num_workers: int, directory: str) -> None:
  """Raises ValueError naming both counts when a checkpoint's input position was saved
  with another `dataset.num_workers` (grain restores it only with the same count; the
  batches themselves do not depend on it)."""
  text = data_state.decode() if isinstance(data_state, bytes) else data_state
  try:
    saved = json.loads(text).get('worker_count')
  except (TypeError, ValueError, AttributeError):
    return  # not a grain DataLoader state: nothing to compare
  if saved is not None and int(saved) != int(num_workers):
    raise ValueError(
        f'config.dataset.num_workers={num_workers}, but the checkpoint in {directory} '
        f'saved its input position with num_workers={saved}; grain resumes it only with '
        f'the same count. Rerun with --config.dataset.num_workers={saved} (the batches '
        'are the same for any count).')


def start_or_resume(config, workdir: str, state: TrainState, train_iter,
                    checkpointer: checkpoints.Checkpointer, writer: metric_writer.MetricWriter,
                    num_devices: int) -> TrainState:
  """The latest checkpoint's state (and input position, set on `train_iter`), or `state`.

  A fresh start logs the model and writes WORKDIR/config.json.
  """
  restored = checkpointer.restore_latest(state)
  if restored is not None:
    state, data_state = restored
    check_input_workers(data_state, config.dataset.num_workers, checkpointer.directory)
    train_iter.set_state(data_state)
    logging.info('Resumed from %s at step %d. %d device(s), parallel=%s.',
                 checkpointer.directory, int(state.step), num_devices, config.parallel)
    if writer.enabled:
      drop_records_after(writer.path, int(state.step))
    return state
  num_params = sum(x.size for x in jax.tree_util.tree_leaves(state.params))
  logging.info('Starting %s/%s from scratch: %d parameters, %d device(s), parallel=%s.',
               config.model.name, config.model.backbone, num_params, num_devices,
               config.parallel)
  if jax.process_index() == 0:
    with open(os.path.join(workdir, 'config.json'), 'w') as f:
      f.write(config.to_json_best_effort(indent=2))
  return state


def run(config, workdir: str, *, state: TrainState, driver, train_iter,
        evaluate: Callable[[Any], dict[str, float]],
        summarize: Callable[[dict[str, float]], str], best_metric: str) -> dict[str, float]:
  """Resumes or starts in `workdir`, trains (see `train`), closes; returns final eval metrics.

  Checkpoints keep the latest `config.keep_checkpoints` plus the
  `config.keep_best_checkpoints` best by `best_metric` of the evaluation.
  """
  checkpointer = checkpoints.Checkpointer(
      os.path.join(workdir, 'checkpoints'), keep=config.keep_checkpoints,
      keep_best=config.keep_best_checkpoints, best_metric=best_metric)
  writer = metric_writer.MetricWriter(workdir)
  state = start_or_resume(config, workdir, state, train_iter, checkpointer, writer,
                          driver.num_devices)
  try:
    # The driver's steps are first traced inside `train`, so they see this choice.
    with layers.conv_weight_grad(config.conv_weight_grad):
      return train(config, driver=driver, device_state=driver.put_state(state),
                   start_step=int(state.step), train_iter=train_iter,
                   checkpointer=checkpointer, writer=writer, evaluate=evaluate,
                   summarize=summarize)
  finally:
    checkpointer.wait()
    checkpointer.close()
    writer.close()


def _evaluate(evaluate, device_state, step: int, writer) -> dict[str, float]:
  """The metrics of `evaluate`; the images it may return with them are written now."""
  result = evaluate(device_state)
  if isinstance(result, tuple):
    result, images = result
    writer.write_images(step, images)
  return result


def train(config, *, driver, device_state, start_step: int, train_iter,
          checkpointer: checkpoints.Checkpointer,
          writer: metric_writer.MetricWriter, evaluate: Callable[[Any], dict[str, float]],
          summarize: Callable[[dict[str, float]], str]) -> dict[str, float]:
  """Trains from the state's step to `config.num_train_steps`; returns the final eval metrics.

  Args:
    start_step: the step `device_state` stands at.
    train_iter: host batches, with `get_state()` (recorded in checkpoints). It is
      read up to `config.prefetch_to_device` batches past the last step's batch.
    evaluate: device_state -> metrics of the whole eval split, or (metrics, images):
      images (tag -> uint8 [H, W, 3]) go to TensorBoard (`MetricWriter.write_images`).
    summarize: metrics -> the short text logged after each evaluation.

  A run that is already finished is evaluated again (so a rerun with other
  evaluation settings, e.g. the dense CRF, reports them) without training.

  Raises:
    Interrupted: after SIGTERM / SIGINT, once the checkpoint of the current step is saved.
  """
  with _stop_requests() as stop:
    return _train(config, stop, driver=driver, device_state=device_state, step=start_step,
                  train_iter=train_iter, checkpointer=checkpointer, writer=writer,
                  evaluate=evaluate, summarize=summarize)


class _FiniteCheck:
  """Watches the steps' 'nonfinite' flags and applies config.nonfinite to new ones."""

  def __init__(self, policy: str, checkpointer: checkpoints.Checkpointer):
    self.policy, self.checkpointer = policy, checkpointer
    self.checked = 0  # flags of pending[:checked] have been looked at

  def __call__(self, pending: list[tuple[int, dict[str, Any]]]) -> None:
    new = pending[self.checked:]
    self.checked = len(pending)
    if not new or 'nonfinite' not in new[0][1]:
      return
    flags = jax.device_get([metrics['nonfinite'] for _, metrics in new])
    for (step, _), flag in zip(new, flags):
      if not flag:
        continue
      if self.policy == 'stop':
        raise NonFiniteLoss(step, self.checkpointer.latest_step(), self.checkpointer.directory)
      logging.warning('non-finite loss or gradients at step %d: update skipped '
                      "(config.nonfinite='skip').", step)

  def reset(self) -> None:
    self.checked = 0


def _train(config, stop: list[int], *, driver, device_state, step: int, train_iter, checkpointer,
           writer, evaluate, summarize) -> dict[str, float]:
  pending: list[tuple[int, dict[str, Any]]] = []
  check_finite = _FiniteCheck(config.nonfinite, checkpointer)
  window_start, window_steps = time.perf_counter(), 0
  eval_metrics = None
  compiled_now = True
  feed = DevicePrefetch(train_iter, driver.put_batch, config.get('prefetch_to_device', 0))
  while step < config.num_train_steps:
    batch = next(feed)
    device_state, metrics = driver.train_step(device_state, batch)
    if compiled_now:  # this process's first step: its compile's memory is free now
      release_free_heap()
      compiled_now = False
    step += 1
    window_steps += 1
    pending.append((step, metrics))
    is_last = step == config.num_train_steps
    if len(pending) - check_finite.checked >= MAX_STEPS_IN_FLIGHT:
      check_finite(pending)  # also the sync that keeps few steps in flight
    if step % config.log_every_steps == 0 or is_last:
      check_finite(pending)
      fetched = jax.device_get([metrics for _, metrics in pending])
      pending = []
      check_finite.reset()
      mean_metrics = {k: float(np.mean([m[k] for m in fetched])) for k in fetched[0]}
      if 'nonfinite' in mean_metrics:
        mean_metrics['skipped_steps'] = float(sum(m['nonfinite'] for m in fetched))
        del mean_metrics['nonfinite']
      steps_per_second = window_steps / (time.perf_counter() - window_start)
      images_per_second = steps_per_second * config.batch_size
      metric_writer.log_train(step, config.num_train_steps, mean_metrics, steps_per_second,
                              images_per_second)
      # Host memory in the record, so a leak per step shows in metrics.jsonl.
      writer.write(step, 'train', {**mean_metrics, 'steps_per_second': steps_per_second,
                                   'images_per_second': images_per_second,
                                   'host_rss_mib': psutil.Process().memory_info().rss / 2**20})
    eval_metrics = None
    if step % config.eval_every_steps == 0 or is_last:
      start = time.perf_counter()
      eval_metrics = _evaluate(evaluate, device_state, step, writer)
      logging.info('eval at step %d (%.1fs): %s', step, time.perf_counter() - start,
                   summarize(eval_metrics))
      writer.write(step, 'eval', eval_metrics)
      release_free_heap()  # the evaluation's compile, its host-side buffers
    stopping = _agreed_stop(stop, step, config)
    if (step % config.checkpoint_every_steps == 0 or is_last or eval_metrics is not None
        or stopping):
      check_finite(pending)
      checkpointer.save(driver.get_state(device_state), feed.get_state(),
                        metrics=eval_metrics)
    if stopping and step < config.num_train_steps:
      checkpointer.wait()
      raise Interrupted(stopping[0], step)
    if eval_metrics is not None or step % config.checkpoint_every_steps == 0:
      window_start, window_steps = time.perf_counter(), 0

  if eval_metrics is None:  # Resumed a finished run: report its final numbers again.
    start = time.perf_counter()
    eval_metrics = _evaluate(evaluate, device_state, step, writer)
    logging.info('already trained to step %d; eval (%.1fs): %s', step,
                 time.perf_counter() - start, summarize(eval_metrics))
  return eval_metrics
