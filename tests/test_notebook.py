"""notebooks/colab_tpu.ipynb runs top to bottom (nbclient) on CPU with a tiny config on
2 simulated devices, and its outputs say what the run did."""

import json
import os
import re

import nbformat
import pytest
from nbclient import NotebookClient

from segjax.train import metric_writer

_NOTEBOOK = os.path.join(os.path.dirname(__file__), '..', 'notebooks', 'colab_tpu.ipynb')
_STEPS = 4
pytestmark = pytest.mark.slow


def _text(cell):
  parts = []
  for output in cell.get('outputs', []):
    if output['output_type'] == 'stream':
      parts.append(output['text'])
    elif 'data' in output and 'text/plain' in output['data']:
      parts.append(output['data']['text/plain'])
  return ''.join(parts)


def test_notebook_runs_top_to_bottom_on_two_cpu_devices(tmp_path, data_dir, monkeypatch):
  workdir = tmp_path / 'run'
  params = dict(dataset='digit_scenes/tiny', data_dir=data_dir, workdir=str(workdir),
                num_train_steps=_STEPS, eval_every_steps=_STEPS, batch_size_per_device=2,
                width_multiplier=0.125, crop_size=(32, 32), parallel='pmap',
                num_examples_to_show=2)
  # The kernel inherits the environment: the parameters and 2 simulated CPU devices.
  monkeypatch.setenv('SEGJAX_NOTEBOOK_PARAMS', json.dumps(params))
  monkeypatch.setenv('XLA_FLAGS', '--xla_force_host_platform_device_count=2')
  monkeypatch.setenv('JAX_PLATFORMS', 'cpu')
  notebook = nbformat.read(_NOTEBOOK, as_version=4)
  NotebookClient(notebook, timeout=300, kernel_name='python3',
                 resources={'metadata': {'path': os.path.dirname(_NOTEBOOK)}}).execute()

  code = [c for c in notebook.cells if c.cell_type == 'code']
  assert 'parameters' in code[0].metadata.get('tags', [])
  text = '\n'.join(_text(c) for c in code)
  assert 'segjax already installed' in text
  assert '2 device(s), 1 process(es)' in text
  assert "'validation': 10" in text                       # digit_scenes/tiny's split sizes
  # Trained with the driver over both devices: global batch 2 x 2 devices.
  assert 'parallel=pmap' in text and '2 device(s), parallel=pmap' in text
  train = metric_writer.read_metrics(str(workdir), 'train')
  evals = metric_writer.read_metrics(str(workdir), 'eval')
  assert train[-1]['step'] == _STEPS and [r['step'] for r in evals] == [_STEPS]
  miou = re.search(r'done in \d+ s: miou=([0-9.]+)', text)
  assert miou and float(miou.group(1)) == pytest.approx(evals[-1]['miou'], abs=1e-4)
  # The metrics table and two PNG images (loss chart, mask grid) are outputs; the grid
  # is 2 rows x 3 panels of 64 px, shown 3x: (3 * 192) x (3 * 128).
  assert f'eval at step {_STEPS}: miou=' in text
  images = [o for c in code for o in c.get('outputs', []) if 'image/png' in o.get('data', {})]
  assert len(images) == 2, len(images)
  assert 'grid size: (576, 384)' in text
  # Only segjax's log lines reach the notebook, not Orbax's INFO flood.
  assert 'step 4/4:' in text and 'CheckpointManager' not in text
  accuracy = re.search(r'pixel accuracy on the images shown: ([0-9.]+)', text)
  assert accuracy and 0.0 <= float(accuracy.group(1)) <= 1.0
  assert 'exported labels == in-process labels: True' in text
  assert (workdir / 'model.bin').stat().st_size > 0
