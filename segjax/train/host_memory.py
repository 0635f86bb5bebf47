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

With `MALLOC_ARENA_MAX=1 MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=4294967296` in the
environment when the process starts (`RETAIN_ENV`), glibc's malloc keeps freed memory
instead: one arena (a worker thread's own arena maps a block larger than its 64 MB heaps
whatever the mmap limit), no `mmap` for large blocks (they come from the heap), no
trimming of the heap's top below 4 GiB free. Freed memory is then reused, not returned
to the OS (`release_free_heap` still returns it when called), and a step faults nothing
in. Set with `mallopt` inside a running process instead, it took effect only in part
(threads that had allocated kept their own arenas) and the Mask R-CNN train step got
slower (0.71-0.77x torchvision's against 0.84x), while from the environment it ran at
1.07x. So the command lines (`segjax.main`, `segjax.predict`, `segjax.benchmark`,
`--host_malloc`) re-execute themselves with `RETAIN_ENV` at start-up (`configure`), before
their heavy imports; a program that imports segjax sets the variables when it starts.
Retaining, they also dispatch XLA CPU computations synchronously
(`dispatch_synchronously`), or the heap holds two steps' temporaries.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import importlib.util
import os
import sys


@functools.cache
def _glibc():
  """The C library where it is glibc (it has `malloc_trim` and reads `RETAIN_ENV`),
  else None."""
  try:
    libc = ctypes.CDLL(ctypes.util.find_library('c') or 'libc.so.6')
    libc.gnu_get_libc_version, libc.malloc_trim  # not musl, not macOS
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
             "stays near its peak), and XLA CPU computations run synchronously; 'system': "
             "malloc as it is; 'auto': 'retain' where JAX can only run on the CPU "
             "(segjax/train/host_memory.py).")

# glibc's malloc settings, read when a process starts (the tunables' environment aliases).
RETAIN_ENV = {'MALLOC_ARENA_MAX': '1', 'MALLOC_MMAP_MAX_': '0',
              'MALLOC_TRIM_THRESHOLD_': str(4 * 2**30)}

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
    jax = sys.modules.get('jax')  # not imported here: the command lines call this first
    platforms = ((jax.config.jax_platforms if jax is not None else None)
                 or os.environ.get('JAX_PLATFORMS', ''))
  if platforms:
    return platforms.split(',')[0].strip().lower() == 'cpu'
  for name in _ACCELERATOR_PLUGINS:
    try:
      if importlib.util.find_spec(name) is not None:
        return False
    except (ImportError, ValueError):  # a parent package is missing
      continue
  return True


def dispatch_synchronously() -> None:
  """Makes XLA CPU run each computation before the call returns (JAX's
  `jax_cpu_enable_async_dispatch` off); call it before JAX's CPU backend starts.

  `configure` does when it retains freed memory. With asynchronous dispatch a step's
  temporaries were freed only after the next step had allocated its own, so the
  retained heap grew to two steps' temporaries: the FCN-ResNet50 train loop (batch 2,
  320x320) peaked at 9.7 GB of RSS against 5.2 GB with this and 4.4 GB with the system's
  malloc, at 3.43, 3.20 and 3.41 s per step (experiments/benchmarks/README.md, "A step's
  temporaries").
  """
  import jax  # here, not at the top: the command lines call `configure` before importing it
  jax.config.update('jax_cpu_enable_async_dispatch', False)


def retained_by_environment() -> bool:
  """Whether this process started with `RETAIN_ENV` (on glibc)."""
  return _glibc() is not None and all(os.environ.get(k) == v for k, v in RETAIN_ENV.items())


def flag_value(argv: list[str]) -> str:
  """--host_malloc's value in `argv` ('auto' when absent), read before absl parses it."""
  for i, arg in enumerate(argv[1:], 1):
    if arg.startswith('--host_malloc='):
      return arg.split('=', 1)[1]
    if arg == '--host_malloc' and i + 1 < len(argv):
      return argv[i + 1]
  return 'auto'


def configure_from_argv(argv: list[str]) -> bool | None:
  """`configure` with --host_malloc's value in `argv`, first thing in a command line;
  None, and nothing done, for a bad value (absl's flag parsing then names it)."""
  mode = flag_value(argv)
  return configure(mode) if mode in MODES else None


def configure(mode: str) -> bool:
  """`--host_malloc`: 'retain' makes the process keep freed memory (module docstring),
  'system' leaves malloc as it is, 'auto' retains where JAX can only run on the CPU
  (`cpu_only`). A process that did not start with the setting asked for re-executes
  itself (`os.execv` of `sys.orig_argv`: same pid, same arguments) with `RETAIN_ENV` set
  or removed, so call this first thing. Retaining, it then turns JAX's asynchronous CPU
  dispatch off (`dispatch_synchronously`, which imports JAX). Returns whether freed
  memory is retained.
  Raises ValueError naming a bad mode."""
  if mode not in MODES:
    raise ValueError(f'--host_malloc={mode!r} is not valid; choose one of {list(MODES)}')
  retain = _glibc() is not None and (mode == 'retain' or (mode == 'auto' and cpu_only()))
  if retain == retained_by_environment():
    if retain:
      dispatch_synchronously()
    return retain
  # Started with the other setting (e.g. inherited from a parent): restart with this one.
  if retain:
    os.environ.update(RETAIN_ENV)
  else:
    for key in RETAIN_ENV:
      os.environ.pop(key, None)
  sys.stdout.flush()
  sys.stderr.flush()
  os.execv(sys.executable, sys.orig_argv)
