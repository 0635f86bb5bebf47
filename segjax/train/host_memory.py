"""Host memory: handing freed heap back to the OS, or keeping it for the next step.

XLA's compiler allocates and frees hundreds of MB while it compiles a large program;
glibc keeps freed heap pages mapped, so they stay in the process's RSS until
`malloc_trim` returns them. The train loop (`segjax.train.loop`) calls
`release_free_heap` after the step that compiled and after each evaluation, and the
benchmark's memory row on both sides after the warm-up step.

The opposite problem is per step. XLA CPU allocates each executable's temporaries as
one block with `malloc` on every call and frees it after: 201 MB for the FCN-ResNet50
inference at 2x320x320, 1.8 GB for its train step. glibc serves blocks that large with
a fresh `mmap` and gives them back with `munmap`, so the kernel maps and zeroes every
page again each step: 52k page faults and ~0.1 s of system time per inference step,
470k and ~1 s per train step (measured 2026-12-05, `experiments/benchmarks/README.md`).

`retain_freed_memory()` sets glibc's malloc (via `mallopt`) to keep freed memory: one
arena (a worker thread's own arena maps a block larger than its 64 MB heaps whatever
the mmap limit), no `mmap` for large blocks (they come from the heap), and no trimming
of the heap's top below 2 GiB free (`mallopt` takes an int). Freed memory is then
reused, not returned to the OS (`release_free_heap` still returns it when called). It
must run before JAX's CPU backend starts its threads (before the first computation or
device query): a thread that already allocated keeps its arena. The command lines call
it at start-up (`--host_malloc`, `configure`); a program that imports segjax can call
it first thing, or set `MALLOC_ARENA_MAX=1 MALLOC_MMAP_MAX_=0
MALLOC_TRIM_THRESHOLD_=4294967296` in the environment (the same settings, read by glibc
when the process starts).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import importlib.util
import os

import jax


@functools.cache
def _glibc():
  """The C library where it is glibc (it has `mallopt` and `malloc_trim`), else None."""
  try:
    libc = ctypes.CDLL(ctypes.util.find_library('c') or 'libc.so.6')
    libc.gnu_get_libc_version, libc.mallopt, libc.malloc_trim  # not musl, not macOS
  except (OSError, AttributeError):
    return None
  return libc


def release_free_heap() -> bool:
  """Hands the C heap's free pages back to the OS (glibc `malloc_trim(0)`).

  FCN-ResNet50 inference held 739 MB over its imports after its first (compiling)
  call and 363 MB after this (experiments/benchmarks/README.md, "Peak memory").
  Returns False where the C library has no `malloc_trim` (not glibc): nothing is done.
  """
  libc = _glibc()
  if libc is None:
    return False
  libc.malloc_trim(0)
  return True


MODES = ('auto', 'retain', 'system')
# The command lines' --host_malloc flag (segjax.main, segjax.predict, segjax.benchmark).
FLAG_HELP = ("'retain': glibc malloc keeps freed memory for reuse, so XLA CPU's per-step "
             "temporaries are not mapped and faulted in again every step (the process's RSS "
             "stays near its peak); 'system': malloc as it is; 'auto': 'retain' where JAX "
             "can only run on the CPU and the model is a semantic one "
             "(segjax/train/host_memory.py).")

# mallopt parameters (glibc's malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8
_INT_MAX = 2**31 - 1

# Packages whose presence means JAX may run on an accelerator, where the host's
# buffers are small and a single malloc arena could slow multithreaded input code.
_ACCELERATOR_PLUGINS = ('jax_cuda12_plugin', 'jax_cuda13_plugin', 'jax_rocm60_plugin',
                        'jax_rocm7_plugin', 'libtpu', 'jax_plugins.xla_cuda12',
                        'jax_plugins.xla_cuda13')


def cpu_only(platforms: str | None = None) -> bool:
  """Whether JAX can only run on the CPU here: `platforms` (default: JAX's
  `jax_platforms` setting or $JAX_PLATFORMS) names 'cpu' first, or is empty and no
  accelerator plugin is installed. Does not start a backend."""
  if platforms is None:
    platforms = jax.config.jax_platforms or os.environ.get('JAX_PLATFORMS', '')
  if platforms:
    return platforms.split(',')[0].strip().lower() == 'cpu'
  for name in _ACCELERATOR_PLUGINS:
    try:
      if importlib.util.find_spec(name) is not None:
        return False
    except (ImportError, ValueError):  # a parent package is missing
      continue
  return True


def retain_freed_memory() -> bool:
  """Makes glibc's malloc keep freed memory for reuse (see the module docstring).
  Returns whether it was applied (False where the C library is not glibc)."""
  libc = _glibc()
  if libc is None:
    return False
  applied = [libc.mallopt(ctypes.c_int(param), ctypes.c_int(value)) == 1
             for param, value in ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0),
                                  (_M_TRIM_THRESHOLD, _INT_MAX))]
  return all(applied)


def configure(mode: str, *, instance_model: bool = False) -> bool:
  """`--host_malloc`: 'retain' applies `retain_freed_memory`, 'system' leaves malloc
  as it is, 'auto' retains when JAX can only run on the CPU (`cpu_only`) and the model
  is not an instance model (`instance_model`): the Mask R-CNN train step measured
  slower with it (torchvision / segjax 0.71 and 0.77 against 0.84 with the system's
  malloc, 2026-12-05; cause not established, the one arena all of XLA's threads then
  share is the suspect). Returns whether freed memory is retained now. Raises
  ValueError naming a bad mode."""
  if mode not in MODES:
    raise ValueError(f'--host_malloc={mode!r} is not valid; choose one of {list(MODES)}')
  if mode == 'system' or (mode == 'auto' and (instance_model or not cpu_only())):
    return False
  return retain_freed_memory()
