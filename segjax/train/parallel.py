"""Data-parallel drivers around the pure steps: `pmap` and `jit` over a device Mesh.

Both take batches of this process's examples and a host TrainState,
and give the same numbers: under `pmap` every device holds a replica and steps
reduce with explicit collectives over `PMAP_AXIS` (BatchNorm statistics too);
under `jit` the batch is one global array sharded over the mesh's 'data' axis
and XLA inserts the collectives (global-batch semantics).

With several JAX processes (`segjax.distributed`) each process passes only its own
examples. `pmap` maps over this process's devices and its collectives span every
process's devices; `jit` builds the Mesh over all devices of all processes and
assembles the global batch from the processes' slices
(`jax.make_array_from_process_local_data`). The state stays fully replicated, so
`get_state` reads this process's copy: no cross-process transfer.

`put_batch` starts the host-to-device copy of a host (numpy) batch and returns the
device arrays; `train_step` and `eval_step` take either (`segjax.train.loop` puts
batches ahead of the step, `DevicePrefetch`).
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import jax_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from segjax.train import steps

PMAP_AXIS = 'batch'
DRIVERS = ('pmap', 'jit')


def bn_axis_name(parallel: str) -> str | None:
  """The axis models must give BatchNorm so statistics are global-batch ones."""
  return PMAP_AXIS if parallel == 'pmap' else None


class PmapDriver:
  """Replicated state, batches split [devices, per_device, ...], explicit psum."""

  def __init__(self, train_step: Callable, num_classes: int, eval_step: Callable | None = None):
    eval_step = eval_step or functools.partial(steps.eval_step, num_classes=num_classes)
    self.devices = jax.local_devices()
    self.num_devices = len(self.devices)
    self._train = jax.pmap(functools.partial(train_step, axis_name=PMAP_AXIS),
                           axis_name=PMAP_AXIS, donate_argnums=(0,))
    self._eval = jax.pmap(functools.partial(eval_step, axis_name=PMAP_AXIS),
                          axis_name=PMAP_AXIS)
    # Leading axis split over the local devices in pmap's order: what pmap takes
    # without another copy.
    self._split_sharding = NamedSharding(Mesh(np.asarray(self.devices), (PMAP_AXIS,)),
                                         PartitionSpec(PMAP_AXIS))

  def put_state(self, state):
    return jax_utils.replicate(state, self.devices)

  def get_state(self, state):
    return jax.device_get(jax_utils.unreplicate(state))

  def put_batch(self, batch: dict[str, np.ndarray]):
    """[b, ...] host arrays -> [devices, b / devices, ...], row i on local device i."""
    if _on_devices(batch):
      return batch
    def split(x):
      if x.shape[0] % self.num_devices:
        raise ValueError(f'per-process batch of {x.shape[0]} does not split over '
                         f'{self.num_devices} local devices')
      return jax.device_put(x.reshape((self.num_devices, -1) + x.shape[1:]),
                            self._split_sharding)
    return jax.tree_util.tree_map(split, batch)

  def train_step(self, state, batch):
    state, metrics = self._train(state, self.put_batch(batch))
    return state, jax.tree_util.tree_map(lambda m: m[0], metrics)

  def eval_step(self, state, batch) -> jnp.ndarray:
    return self._eval(state, self.put_batch(batch))[0]


class JitDriver:
  """One global batch sharded over Mesh(devices, ('data',)); state replicated."""

  def __init__(self, train_step: Callable, num_classes: int, eval_step: Callable | None = None):
    eval_step = eval_step or functools.partial(steps.eval_step, num_classes=num_classes)
    self.devices = jax.devices()
    self.num_devices = len(self.devices)
    self.mesh = Mesh(np.asarray(self.devices), ('data',))
    self.replicated = NamedSharding(self.mesh, PartitionSpec())
    self.data_sharding = NamedSharding(self.mesh, PartitionSpec('data'))
    self._train = jax.jit(train_step, in_shardings=(self.replicated, self.data_sharding),
                          out_shardings=(self.replicated, self.replicated),
                          donate_argnums=(0,))
    self._eval = jax.jit(eval_step, in_shardings=(self.replicated, self.data_sharding),
                         out_shardings=self.replicated)

  def put_state(self, state):
    return jax.device_put(state, self.replicated)

  def get_state(self, state):
    return jax.device_get(state)

  def put_batch(self, batch: dict[str, np.ndarray]):
    """This process's rows -> one global array sharded over the mesh's 'data' axis."""
    if _on_devices(batch):
      return batch
    def to_global(x):
      global_shape = (x.shape[0] * jax.process_count(),) + x.shape[1:]
      if global_shape[0] % self.num_devices:
        raise ValueError(f'global batch of {global_shape[0]} does not split over '
                         f'{self.num_devices} devices')
      return jax.make_array_from_process_local_data(self.data_sharding, x, global_shape)
    return jax.tree_util.tree_map(to_global, batch)

  def train_step(self, state, batch):
    return self._train(state, self.put_batch(batch))

  def eval_step(self, state, batch) -> jnp.ndarray:
    return self._eval(state, self.put_batch(batch))


def _on_devices(batch) -> bool:
  """Whether `batch` is already a driver's `put_batch` output (device arrays)."""
  return all(isinstance(x, jax.Array) for x in jax.tree_util.tree_leaves(batch))


def make_driver(parallel: str, train_step: Callable, num_classes: int,
                eval_step: Callable | None = None) -> Any:
  """`eval_step(state, batch, *, axis_name=None)`: default `steps.eval_step` (argmax)."""
  if parallel == 'pmap':
    return PmapDriver(train_step, num_classes, eval_step)
  if parallel == 'jit':
    return JitDriver(train_step, num_classes, eval_step)
  raise ValueError(f'config.parallel={parallel!r} is not one of {DRIVERS}')
