"""Fixtures shared by the test modules."""

import pytest

from segjax.data import sources


@pytest.fixture(scope='session')
def data_dir(tmp_path_factory):
  """A TFDS data dir holding `digit_scenes/tiny` (40 / 10 / 10 scenes), built once per session.

  Modules that need an empty data dir (e.g. to test building on first use) define their own.
  """
  d = str(tmp_path_factory.mktemp('tfds'))
  sources.get_builder('digit_scenes/tiny', d)
  return d
