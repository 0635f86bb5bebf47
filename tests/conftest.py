"""Fixtures shared by the test modules, and a compilation cache for the tests' subprocesses."""

import os
import shutil
import tempfile

import jax
import pytest

from segjax.data import sources

# Many tests run `segjax.main` (or a helper script) in subprocesses on the same tiny
# configs; each such process compiled the same XLA programs again. They share one
# persistent compilation cache, fresh for each pytest session, so a rerun loads the
# executable instead. The test process itself keeps the cache off: tests count its
# backend compilations (jit caching, the benchmark's compile count), and a cache hit
# is not a compilation.
_SUBPROCESS_CACHE = tempfile.mkdtemp(prefix='segjax-tests-jax-cache-')
os.environ['JAX_COMPILATION_CACHE_DIR'] = _SUBPROCESS_CACHE
os.environ['JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS'] = '0'
jax.config.update('jax_enable_compilation_cache', False)


def pytest_sessionfinish(session, exitstatus):
  del session, exitstatus
  shutil.rmtree(_SUBPROCESS_CACHE, ignore_errors=True)


@pytest.fixture(scope='session')
def data_dir(tmp_path_factory):
  """A TFDS data dir holding `digit_scenes/tiny` (40 / 10 / 10 scenes), built once per session.

  Modules that need an empty data dir (e.g. to test building on first use) define their own.
  """
  d = str(tmp_path_factory.mktemp('tfds'))
  sources.get_builder('digit_scenes/tiny', d)
  return d


# The suite runs on 2 xdist workers, one file at a time per worker (pyproject's addopts:
# `--dist loadfile --no-loadscope-reorder`). Files are handed out in collection order,
# so the slowest files go first (longest-processing-time-first): otherwise a 20-minute
# file can start last and leave the other worker idle at the end. The order comes from
# the per-test durations of CI's one-process runs; the rest keep pytest's order.
_SLOWEST_FILES_FIRST = (
    'test_main.py',
    'test_multihost.py',
    'test_mask_rcnn.py',
    'test_detection_trainer.py',
    'test_parallel.py',
    'test_steps.py',
    'test_models_registry.py',
    'test_studies.py',
    'test_predict.py',
)


def pytest_collection_modifyitems(config, items):
  del config
  rank = {name: i for i, name in enumerate(_SLOWEST_FILES_FIRST)}
  items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: files stay whole
