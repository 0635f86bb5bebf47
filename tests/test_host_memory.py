"""segjax.train.host_memory: freed heap pages go back to the OS."""

import numpy as np
import pytest

from segjax.benchmarks import measure
from segjax.train import host_memory


def test_release_free_heap_returns_freed_pages_to_the_os():
  """500 MB in 64 KiB blocks (below glibc's mmap threshold: they live in the heap), one
  block in 64 kept so the heap cannot shrink from its top: freeing the rest leaves the
  RSS up until release_free_heap hands the free pages back."""
  if not host_memory.release_free_heap():
    pytest.skip('no malloc_trim in this C library (not glibc)')
  blocks = [np.ones(8192) for _ in range(8000)]  # 8192 float64 = 64 KiB each
  kept = blocks[::64]
  before = measure.rss_bytes()
  del blocks
  freed = measure.rss_bytes()
  assert host_memory.release_free_heap()
  after = measure.rss_bytes()
  assert freed - before > -50 * 2**20  # free() alone gave (almost) nothing back
  assert freed - after > 300 * 2**20, (before, freed, after)
  assert len(kept) == 125
