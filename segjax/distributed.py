"""Starting JAX's multi-process runtime (`jax.distributed`) before anything touches a device.

One process runs per host (or, for a local test, several per machine). They find
each other through a coordinator; afterwards `jax.devices()` lists every process's
devices, `jax.local_devices()` this process's, and collectives (the `jit` driver's
global-batch reductions, the `pmap` driver's `pmean`) span all of them.

    initialize(mode='manual', coordinator_address='10.0.0.1:1234',
               num_processes=4, process_id=0)   # every process, its own id
    initialize(mode='auto')                     # Cloud TPU pod slice, SLURM, ...
    initialize(mode='off')                      # one process (the default)

'auto' calls `jax.distributed.initialize()` without arguments, which detects the
cluster from its environment (Cloud TPU metadata, SLURM_* or OMPI_* variables).
"""

from __future__ import annotations

import jax
from absl import logging

MODES = ('off', 'manual', 'auto')


def initialize(mode: str = 'off', *, coordinator_address: str | None = None,
               num_processes: int | None = None, process_id: int | None = None) -> None:
  """Joins this process to the run; a no-op for `mode='off'`.

  Must run before the first JAX computation or device query. On CPU the
  cross-process collectives need an implementation: gloo is selected (the
  setting only concerns the CPU backend, so it is harmless on GPU and TPU).

  Raises:
    ValueError: an unknown mode, or 'manual' with a missing or inconsistent value,
      naming it.
  """
  if mode not in MODES:
    raise ValueError(f'--distributed={mode!r} is not one of {MODES}')
  if mode == 'off':
    given = {name: value for name, value in (('coordinator_address', coordinator_address),
                                             ('num_processes', num_processes),
                                             ('process_id', process_id)) if value is not None}
    if given:
      raise ValueError(f'{sorted(given)} given with --distributed=off; pass '
                       '--distributed=manual (or leave them out)')
    return
  if mode == 'manual':
    missing = [name for name, value in (('coordinator_address', coordinator_address),
                                        ('num_processes', num_processes),
                                        ('process_id', process_id)) if value is None]
    if missing:
      raise ValueError(f'--distributed=manual needs --{", --".join(missing)}')
    if num_processes < 1 or not 0 <= process_id < num_processes:
      raise ValueError(f'--process_id={process_id} must be in [0, --num_processes='
                       f'{num_processes})')
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  if mode == 'manual':
    jax.distributed.initialize(coordinator_address=coordinator_address,
                               num_processes=num_processes, process_id=process_id)
  else:
    jax.distributed.initialize()
  logging.info('JAX process %d of %d: %d local device(s), %d in all.', jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count())
