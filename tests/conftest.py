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
# so the slowest files go first (longest-processing-time-first): otherwise a 10-minute
# file can start last and leave the other worker idle at the end. Order and seconds
# from the per-test times of CI's first 2-worker run (2026-12-03: the workers' tests
# summed to 5,360 s in 2,736 s of wall time); the rest keep pytest's order.
_SLOWEST_FILES_FIRST = (
    'test_main.py',  # 658 s
    'test_mask_rcnn.py',  # 591 s
    'test_steps.py',  # 480 s
    'test_configs_train.py',  # 444 s
    'test_multihost.py',  # 427 s
    'test_detection_trainer.py',  # 266 s
    'test_models_registry.py',  # 242 s
    'test_layers.py',  # 226 s
    'test_export.py',  # 198 s
    'test_loop.py',  # 189 s
)


def pytest_collection_modifyitems(config, items):
  del config
  rank = {name: i for i, name in enumerate(_SLOWEST_FILES_FIRST)}
  items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: files stay whole
