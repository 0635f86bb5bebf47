"""segjax.train.host_memory: freed heap pages go back to the OS, or stay for reuse."""

import os
import subprocess
import sys

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


_CYCLES = '''
import ctypes, resource, sys
from segjax.train import host_memory
retained = host_memory.configure(sys.argv[1])
libc = host_memory._glibc()
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
size = 200 * 2**20                                  # above any mmap threshold
faults = []
for _ in range(4):
  before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  block = libc.malloc(size)
  ctypes.memset(block, 1, size)
  libc.free(block)
  faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
import jax
print(retained, jax.config.values['jax_cpu_enable_async_dispatch'], *faults)
'''


@pytest.mark.parametrize('mode,inherited', [('retain', False), ('system', False),
                                            ('system', True)])
def test_retained_memory_is_not_faulted_in_again(mode, inherited):
  """A 200 MB block malloc'ed, written and freed four times (as XLA CPU does with a
  step's temporaries): with the system's malloc every cycle maps it afresh (~51k page
  faults of 4 KiB); retained, only the first does, and JAX's CPU dispatch is synchronous.
  The process restarts itself with the setting asked for, also when it inherited the
  other one (`inherited`)."""
  if host_memory._glibc() is None:
    pytest.skip('not glibc')
  env = dict(os.environ)
  for key in host_memory.RETAIN_ENV:
    env.pop(key, None)
  if inherited:
    env.update(host_memory.RETAIN_ENV)
  out = subprocess.run([sys.executable, '-c', _CYCLES, mode], capture_output=True,
                       text=True, check=True, env=env).stdout.split()
  retained, asynchronous = out[0] == 'True', out[1] == 'True'
  faults = [int(v) for v in out[2:]]
  pages = 200 * 2**20 // 4096
  assert retained == (mode == 'retain')
  # Retaining, XLA CPU runs computations synchronously (else two steps' temporaries).
  assert asynchronous == (mode != 'retain')
  assert faults[0] > 0.9 * pages
  if mode == 'retain':
    assert max(faults[1:]) < 0.05 * pages, faults
  else:
    assert min(faults[1:]) > 0.9 * pages, faults


def test_host_malloc_mode_is_checked():
  with pytest.raises(ValueError, match=r"--host_malloc='keep'.*'auto', 'retain', 'system'"):
    host_memory.configure('keep')
  assert not host_memory.configure('system')
  assert host_memory.flag_value(['x', '--host_malloc', 'retain']) == 'retain'
  assert host_memory.flag_value(['x', '--host_malloc=system', '--y=1']) == 'system'
  assert host_memory.flag_value(['x']) == 'auto'
  assert host_memory.configure_from_argv(['x', '--host_malloc=keep']) is None  # absl names it


def test_auto_retains_only_where_jax_runs_on_the_cpu_alone(monkeypatch):
  assert not host_memory.cpu_only('cuda,cpu')
  assert host_memory.cpu_only('cpu')
  monkeypatch.setattr(host_memory, '_ACCELERATOR_PLUGINS', ('numpy',))  # "installed"
  assert not host_memory.cpu_only('')
  monkeypatch.setattr(host_memory, '_ACCELERATOR_PLUGINS', ('no_such_plugin.x', 'nope'))
  assert host_memory.cpu_only('')
