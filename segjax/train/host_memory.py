"""Host memory held by freed allocations: handing it back to the OS.

XLA's compiler allocates and frees hundreds of MB while it compiles a large program;
glibc keeps freed heap pages mapped, so they stay in the process's RSS until
`malloc_trim` returns them. The train loop (`segjax.train.loop`) calls
`release_free_heap` after the step that compiled and after each evaluation, and the
benchmark's memory row on both sides after the warm-up step.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools


@functools.cache
def _malloc_trim():
  try:
    return ctypes.CDLL(ctypes.util.find_library('c') or 'libc.so.6').malloc_trim
  except (OSError, AttributeError):
    return None


def release_free_heap() -> bool:
  """Hands the C heap's free pages back to the OS (glibc `malloc_trim(0)`).

  FCN-ResNet50 inference held 739 MB over its imports after its first (compiling)
  call and 363 MB after this (experiments/benchmarks/README.md, "Peak memory").
  Returns False where the C library has no `malloc_trim` (not glibc): nothing is done.
  """
  trim = _malloc_trim()
  if trim is None:
    return False
  trim(0)
  return True
