"""pmap == jit == one device, on 8 simulated CPU devices (in a subprocess: the
device count is fixed when JAX starts)."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

_SCRIPT = os.path.join(os.path.dirname(__file__), 'parallel_equivalence_run.py')


@pytest.fixture(scope='module')
def report():
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=8')
  result = subprocess.run([sys.executable, _SCRIPT], env=env, capture_output=True, text=True,
                          timeout=600, check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  return json.loads(result.stdout.strip().splitlines()[-1])


def test_losses_agree_across_drivers(report):
  single = np.array(report['losses']['single'])
  for kind in ('pmap', 'jit'):
    np.testing.assert_allclose(report['losses'][kind], single, rtol=2e-5, err_msg=kind)


def test_parameters_and_batch_stats_agree_across_drivers(report):
  # The steps move the backbone too (not only the zero-initialised score layers).
  assert report['backbone_change'] > 1e-2, report
  for kind in ('pmap', 'jit'):
    assert report[f'{kind}_params_diff'] < 1e-4 * report['param_change'], report
    assert report[f'{kind}_batch_stats_diff'] < 1e-4, report
