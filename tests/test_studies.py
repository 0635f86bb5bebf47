"""experiments/studies.py end to end on digit_scenes/tiny: runs, reuse, re-evaluation, outputs."""

import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ['--config.dataset.name=digit_scenes/tiny', '--config.num_train_steps=4',
        '--config.eval_every_steps=2', '--config.log_every_steps=2',
        '--config.checkpoint_every_steps=2', '--config.eval_batch_size=10',
        '--config.model.width_multiplier=0.125', '--config.eval.num_images=0']


def _study(tmp_path, *args):
  cmd = [sys.executable, os.path.join(REPO, 'experiments', 'studies.py'), *args,
         f'--outdir={tmp_path / "runs"}', f'--results_dir={tmp_path / "results"}']
  cmd += [f'--override={o}' for o in TINY]
  proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900,
                        env={**os.environ, 'TFDS_DATA_DIR': str(tmp_path / 'tfds')})
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  return proc.stdout


@pytest.mark.slow
def test_crf_study_runs_reuses_and_plots(tmp_path):
  out = _study(tmp_path, 'crf', '--only=fcn8s,fcn8s+crf')
  results = json.loads((tmp_path / 'results' / 'crf' / 'results.json').read_text())
  runs = {r['label']: r for r in results['runs']}
  assert set(runs) == {'fcn8s', 'fcn8s+crf'}
  trained = runs['fcn8s']
  assert [p['step'] for p in trained['curve']] == [2, 4]
  # The final record is the run's own final evaluation; the CRF variant's is parsed
  # from its re-evaluation log line (4 decimals), which the trimap evaluation (same
  # config, CRF on) repeats from the checkpoint.
  workdir = out.split('--workdir=')[1].split()[0]
  evals = [json.loads(l) for l in open(os.path.join(workdir, 'metrics.jsonl'))
           if '"eval"' in l]
  assert [e['step'] for e in evals] == [2, 4]
  assert trained['final']['miou'] == evals[1]['miou']
  crf = runs['fcn8s+crf']
  assert crf['reeval_of'] == 'fcn8s' and 'curve' not in crf
  log = open(os.path.join(workdir, 'reeval-fcn8s+crf.log')).read()
  assert f"miou={crf['final']['miou']:.4f}" in log
  assert crf['final']['pixel_accuracy'] == pytest.approx(
      json.load(open(os.path.join(workdir, 'trimap.json')))['pixel_accuracy'], abs=1e-4)
  # The trimap evaluation predicts again from the checkpoint: it must agree with the
  # run's own evaluation.
  assert trained['final']['pixel_accuracy'] == pytest.approx(evals[1]['pixel_accuracy'],
                                                             abs=1e-6)
  assert 0 <= trained['final']['trimap_accuracy@2'] <= 1
  assert trained['parameters'] > 0 and trained['train_images_per_second_median'] > 0
  for name in ('curves.png', 'final.png'):
    assert (tmp_path / 'results' / 'crf' / name).read_bytes()[:4] == b'\x89PNG'
  table = (tmp_path / 'results' / 'crf' / 'table.md').read_text()
  assert f"| fcn8s | 0 | {trained['final']['miou']:.4f} |" in table
  # An identical run (same config, overrides, seed) is reused, not trained again.
  again = _study(tmp_path, 'fcn_upsampling', '--only=deconv')
  assert 'reusing the finished identical run' in again
  upsampling = json.loads((tmp_path / 'results' / 'fcn_upsampling' / 'results.json').read_text())
  assert upsampling['runs'][0]['final']['miou'] == trained['final']['miou']
