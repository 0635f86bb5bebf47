"""Orbax checkpoints of the training state and the input iterator, in WORKDIR/checkpoints.

Each checkpoint step holds two items: 'state' (the TrainState arrays, saved from
host copies so a checkpoint is independent of the driver and device count that
wrote it) and 'data' (the grain iterator state, so a resumed run sees exactly the
batches an uninterrupted one would). Saves are asynchronous and atomic: Orbax
writes to a temporary directory and renames it when complete, so a killed run
leaves no partial checkpoint as the latest. Retention keeps the latest
`keep` checkpoints plus the `keep_best` best by a validation metric (mIoU for the
semantic models, COCO AP for the detectors).
"""

from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers

from segjax.train.state import TrainState



def state_arrays(state: TrainState) -> dict[str, Any]:
  """The saved part of a TrainState: everything but the apply function and optimizer."""
  return {'step': state.step, 'params': state.params, 'batch_stats': state.batch_stats,
          'opt_state': state.opt_state, 'rng': state.rng}


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
    self.manager = ocp.CheckpointManager(self.directory, options=options,
                                         item_names=('state', 'data'))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, state: TrainState, data_state: Any, *, metrics: dict[str, float] | None = None,
           force: bool = False) -> bool:
    """Starts an async save of `state` (host arrays) at `state.step`."""
    arrays = jax.device_get(state_arrays(state))
    step = int(arrays['step'])
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
    arrays = restored['state']
    state = template.replace(**arrays)
    return state, _decode(restored['data'])

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.close()


def _encode(data_state: Any) -> dict[str, Any]:
  # grain iterator states are bytes (a JSON document); Orbax's JsonSave needs text.
  if isinstance(data_state, bytes):
    return {'kind': 'bytes', 'value': data_state.decode('utf-8')}
  return {'kind': 'json', 'value': data_state}


def _decode(saved: dict[str, Any]) -> Any:
  if saved['kind'] == 'bytes':
    return saved['value'].encode('utf-8')
  return saved['value']
