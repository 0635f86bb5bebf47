"""Orbax checkpoints of the training state and the input iterator, in WORKDIR/checkpoints.

Each checkpoint step holds two items: 'state' (the TrainState arrays, saved from
host copies so a checkpoint is independent of the driver and device count that
wrote it) and 'data' (the grain iterator state, so a resumed run sees exactly the
batches an uninterrupted one would). Saves are asynchronous and atomic: Orbax
writes to a temporary directory and renames it when complete, so a killed run
leaves no partial checkpoint as the latest. Retention keeps the latest
`keep` checkpoints plus the `keep_best` best by a validation metric (mIoU for the
semantic models, COCO AP for the detectors).

Resuming (`restore_latest`) trusts nothing on disk: a latest checkpoint that cannot
be read (truncated or corrupted file, missing entry) is reported, moved aside to
WORKDIR/checkpoints_corrupt/STEP and the previous one is used. A readable checkpoint
whose parameter names or shapes differ from the model's (another model or config
wrote this workdir) raises `CheckpointMismatch` naming them; it is never loaded
partially. Parameters with NaN or infinity are never written (`save` raises).
"""

from __future__ import annotations

import os
import shutil
from typing import Any

import flax

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from orbax.checkpoint import checkpoint_managers

from segjax.train import loss_scale
from segjax.train.state import TrainState



class CheckpointMismatch(ValueError):
  """A checkpoint's parameters do not fit the model it is restored into."""


class NoReadableCheckpoint(RuntimeError):
  """Every checkpoint in the directory failed to restore."""


def state_arrays(state: TrainState) -> dict[str, Any]:
  """The saved part of a TrainState: everything but the apply function and optimizer
  (the float16 loss scale only where the state has one)."""
  arrays = {'step': state.step, 'params': state.params, 'batch_stats': state.batch_stats,
            'opt_state': state.opt_state, 'rng': state.rng}
  if state.loss_scale is not None:
    arrays['loss_scale'] = state.loss_scale.to_dict()
  return arrays


class Checkpointer:
  """Save / restore (TrainState, data-iterator state) pairs under `directory`."""

  def __init__(self, directory: str, *, keep: int = 2, keep_best: int = 1,
               best_metric: str = 'miou', async_save: bool = True):
    # Orbax resolves relative paths only later, in a background thread (DESIGN.md).
    self.directory = os.path.abspath(directory)
    self.best_metric = best_metric
    policy = checkpoint_managers.AnyPreservationPolicy([
        checkpoint_managers.LatestN(keep),
        checkpoint_managers.BestN(get_metric_fn=lambda m: m[best_metric],
                                  n=keep_best, keep_checkpoints_without_metrics=False),
    ])
    options = ocp.CheckpointManagerOptions(
        preservation_policy=policy, enable_async_checkpointing=async_save, create=True)
    # Handlers given up front so that metadata can be read before any save or restore.
    self.manager = ocp.CheckpointManager(
        self.directory, options=options,
        item_handlers={'state': ocp.StandardCheckpointHandler(),
                       'data': ocp.JsonCheckpointHandler()})

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, state: TrainState, data_state: Any, *, metrics: dict[str, float] | None = None,
           force: bool = False) -> bool:
    """Starts an async save of `state` (host arrays) at `state.step`."""
    arrays = jax.device_get(state_arrays(state))
    step = int(arrays['step'])
    bad = _first_nonfinite(arrays['params'])
    if bad is not None:
      raise ValueError(f'refusing to save step {step}: parameter {bad} is not finite')
    best_metrics = None
    if metrics is not None and self.best_metric in metrics:
      best_metrics = {self.best_metric: float(metrics[self.best_metric])}
    return self.manager.save(
        step, args=ocp.args.Composite(state=ocp.args.StandardSave(arrays),
                                      data=ocp.args.JsonSave(_encode(data_state))),
        metrics=best_metrics, force=force)

  def restore(self, template: TrainState, step: int | None = None) -> tuple[TrainState, Any]:
    """Restores `step` (default: latest) into the structure of `template`."""
    step = self.manager.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f'no checkpoint in {self.directory}')
    target = jax.device_get(state_arrays(template))  # numpy leaves: restore to host
    restored = self.manager.restore(
        step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target),
                                      data=ocp.args.JsonRestore()))
    arrays = dict(restored['state'])
    if 'loss_scale' in arrays:
      arrays['loss_scale'] = loss_scale.DynamicLossScale.from_dict(arrays['loss_scale'])
    state = template.replace(**arrays)
    return state, _decode(restored['data'])

  def restore_arrays(self, step: int | None = None) -> tuple[dict[str, Any], int]:
    """(the saved state arrays as nested dicts, step) of `step` (default: the latest),
    without a template: no model or optimizer needs to be built (export, inspection)."""
    available = sorted(self.manager.all_steps())
    if not available:
      raise FileNotFoundError(f'no checkpoint in {self.directory}')
    step = available[-1] if step is None else step
    if step not in available:
      raise ValueError(f'step {step} has no checkpoint in {self.directory}; saved steps: '
                       f'{available}')
    restored = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore()))
    return restored['state'], step

  def restore_latest(self, template: TrainState) -> tuple[TrainState, Any] | None:
    """The newest checkpoint that restores, as `restore`; None if there is none.

    Unreadable checkpoints are logged and moved to `quarantine_dir` one by one, newest
    first, until one restores. Raises CheckpointMismatch (from the newest readable
    one) if the model differs, NoReadableCheckpoint if none restores.
    """
    steps = sorted(self.manager.all_steps(), reverse=True)
    if not steps:
      return None
    for step in steps:
      try:
        self.check_compatible(template, step)
        return self.restore(template, step)
      except CheckpointMismatch:
        raise
      except Exception as error:  # pylint: disable=broad-except
        moved = self._quarantine(step)
        logging.warning('checkpoint step %d in %s cannot be read (%s: %s); moved it to %s '
                        'and trying the previous one.', step, self.directory,
                        type(error).__name__, str(error).splitlines()[0][:300], moved)
    raise NoReadableCheckpoint(
        f'none of the checkpoints {sorted(steps)} in {self.directory} could be read (each was '
        f'moved to {self.quarantine_dir}); delete the workdir, or pick another, to start anew')

  @property
  def quarantine_dir(self) -> str:
    return self.directory.rstrip(os.sep) + '_corrupt'

  def _quarantine(self, step: int) -> str:
    os.makedirs(self.quarantine_dir, exist_ok=True)
    target = os.path.join(self.quarantine_dir, str(step))
    if os.path.exists(target):
      shutil.rmtree(target)
    shutil.move(os.path.join(self.directory, str(step)), target)
    self.manager.reload()
    return target

  def check_compatible(self, template: TrainState, step: int) -> None:
    """Raises CheckpointMismatch naming parameters whose names or shapes differ.

    Reading the metadata may raise other errors for a damaged checkpoint.
    """
    saved = self.manager.item_metadata(step)['state'].tree
    expected = jax.device_get(state_arrays(template))
    problems = []
    for section in ('params', 'batch_stats'):
      have = flax.traverse_util.flatten_dict(saved.get(section) or {}, sep='/')
      want = flax.traverse_util.flatten_dict(expected[section] or {}, sep='/')
      missing, extra = sorted(set(want) - set(have)), sorted(set(have) - set(want))
      if missing:
        problems.append(f'{section} the model has but the checkpoint lacks: {_some(missing)}')
      if extra:
        problems.append(f'{section} in the checkpoint the model lacks: {_some(extra)}')
      shapes = [f'{name} {tuple(have[name].shape)} in the checkpoint vs '
                f'{tuple(np.shape(want[name]))} in the model'
                for name in sorted(set(want) & set(have))
                if tuple(have[name].shape) != tuple(np.shape(want[name]))]
      if shapes:
        problems.append(f'{section} shapes differ: {_some(shapes)}')
    if ('loss_scale' in saved) != ('loss_scale' in expected):
      problems.append('the checkpoint ' + ('has' if 'loss_scale' in saved else 'lacks')
                      + ' a float16 loss scale and the config '
                      + ('does not use one' if 'loss_scale' in saved else 'does')
                      + ' (model.dtype, config.loss_scaling)')
    if problems:
      raise CheckpointMismatch(
          f'checkpoint step {step} in {self.directory} was written by a different model or '
          f'config: {"; ".join(problems)}. Use a new --workdir for a different model, or '
          'config.init_from to start from parts of this one.')

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.close()


def _some(names: list[str], limit: int = 5) -> str:
  more = f' and {len(names) - limit} more' if len(names) > limit else ''
  return ', '.join(names[:limit]) + more


def _first_nonfinite(tree: Any) -> str | None:
  """Path ('a/b/kernel') of the first leaf with a NaN or infinity, or None."""
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    if not np.all(np.isfinite(leaf)):
      return '/'.join(str(getattr(k, 'key', k)) for k in path)
  return None


def _encode(data_state: Any) -> dict[str, Any]:
  # grain iterator states are bytes (a JSON document); Orbax's JsonSave needs text.
  if isinstance(data_state, bytes):
    return {'kind': 'bytes', 'value': data_state.decode('utf-8')}
  return {'kind': 'json', 'value': data_state}


def _decode(saved: dict[str, Any]) -> Any:
  if saved['kind'] == 'bytes':
    return saved['value'].encode('utf-8')
  return saved['value']
