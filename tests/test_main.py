"""End-to-end runs of `python -m segjax.main` on a tiny digit_scenes build:
train + eval + checkpoint, and kill -9 then rerun resuming to identical parameters."""

import importlib.util
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from segjax.train import checkpoints, metric_writer, trainer

_CONFIG = os.path.join(os.path.dirname(__file__), '..', 'configs', 'fcn8s.py')
pytestmark = pytest.mark.slow


# A tiny model on a tiny build, shared by the CLI flags and the restore template.
# torchvision's stride-4 stem, not the preset's stride-1 one (16x the backbone compute):
# these tests are about the loop, the CLI and checkpoints, not the architecture.
_TINY = {'dataset.name': 'digit_scenes/tiny', 'model.backbone': 'resnet18',
         'model.stem_stride': 4,
         'model.width_multiplier': 0.125, 'dataset.crop_size': (32, 32)}


def _tiny_overrides(data_dir, num_train_steps, checkpoint_every, eval_every):
  return [
      *(f'--config.{field}={value}' for field, value in _TINY.items()),
      f'--config.dataset.data_dir={data_dir}', '--config.batch_size=4',
      '--config.eval_batch_size=4', f'--config.num_train_steps={num_train_steps}',
      f'--config.checkpoint_every_steps={checkpoint_every}',
      f'--config.eval_every_steps={eval_every}', '--config.log_every_steps=2',
      '--config.eval.tta.scales=(1.0,)',  # one test scale: these runs test the loop
      '--config.optimizer.warmup_steps=2',
  ]


def _command(workdir, overrides):
  return [sys.executable, '-m', 'segjax.main', f'--config={_CONFIG}', f'--workdir={workdir}',
          *overrides]


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp('tfds'))


def test_main_trains_evaluates_and_checkpoints(tmp_path, data_dir):
  workdir = tmp_path / 'run'
  result = subprocess.run(_command(workdir, _tiny_overrides(data_dir, 6, 3, 3)),
                          capture_output=True, text=True, timeout=600, check=False)
  assert result.returncode == 0, result.stderr[-4000:]
  train = metric_writer.read_metrics(str(workdir), 'train')
  evals = metric_writer.read_metrics(str(workdir), 'eval')
  assert [r['step'] for r in train] == [2, 4, 6]
  assert [r['step'] for r in evals] == [3, 6]
  for record in evals:
    assert 0.0 <= record['miou'] <= 1.0
    assert 0.0 < record['pixel_accuracy'] <= 1.0
    assert set(r for r in record if r.startswith('iou/')) == {
        'iou/background', *(f'iou/{d}' for d in range(10))}
  assert all(np.isfinite(r['loss']) for r in train)
  assert 'final eval: miou=' in result.stderr
  assert os.listdir(workdir / 'tensorboard')
  assert checkpoints.Checkpointer(str(workdir / 'checkpoints')).latest_step() == 6


def _final_state(workdir):
  """Restores the last checkpoint of `workdir` into the structure of a fresh tiny state."""
  spec = importlib.util.spec_from_file_location('fcn8s', _CONFIG)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  for field, value in _TINY.items():
    section, name = field.split('.')
    config[section][name] = value
  template = trainer.create_state(config)
  state, _ = checkpoints.Checkpointer(os.path.join(workdir, 'checkpoints')).restore(template)
  return state


_STEPS = 40


@pytest.fixture(scope='module')
def reference_run(tmp_path_factory, data_dir):
  """An uninterrupted 40-step run: (its overrides, its final state arrays, its workdir)."""
  overrides = _tiny_overrides(data_dir, _STEPS, 4, _STEPS)
  reference = tmp_path_factory.mktemp('reference')
  result = subprocess.run(_command(reference, overrides), capture_output=True, text=True,
                          timeout=600, check=False)
  assert result.returncode == 0, result.stderr[-4000:]
  return overrides, checkpoints.state_arrays(_final_state(str(reference))), reference


def _assert_same_arrays(expected, actual):
  leaves = jax.tree_util.tree_leaves
  for a, b in zip(leaves(expected), leaves(actual), strict=True):
    np.testing.assert_array_equal(a, b)


def _wait_for(predicate, process, timeout=300):
  deadline = time.time() + timeout
  while time.time() < deadline and process.poll() is None:
    if predicate():
      return True
    time.sleep(0.05)
  return False


def test_kill_and_rerun_resumes_to_identical_parameters(tmp_path, reference_run):
  steps = _STEPS
  overrides, expected, _ = reference_run

  interrupted = tmp_path / 'interrupted'
  process = subprocess.Popen(_command(interrupted, overrides), stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
  checkpoint_dir = interrupted / 'checkpoints'
  _wait_for(lambda: checkpoint_dir.exists()
            and any(p.name.isdigit() for p in checkpoint_dir.iterdir()), process)
  process.send_signal(signal.SIGKILL)
  process.wait()
  saved = checkpoints.Checkpointer(str(checkpoint_dir)).latest_step()
  assert saved is not None and saved < steps, saved

  resumed = subprocess.run(_command(interrupted, overrides), capture_output=True, text=True,
                           timeout=600, check=False)
  assert resumed.returncode == 0, resumed.stderr[-4000:]
  assert f'at step {saved}.' in resumed.stderr
  train_steps = [r['step'] for r in metric_writer.read_metrics(str(interrupted), 'train')]
  assert train_steps == list(range(2, steps + 1, 2))  # no step logged twice or lost

  actual = checkpoints.state_arrays(_final_state(str(interrupted)))
  assert int(actual['step']) == steps
  _assert_same_arrays(expected, actual)


@pytest.mark.parametrize('signum', [signal.SIGTERM, signal.SIGINT])
def test_signal_saves_the_current_step_exits_and_rerun_finishes_identically(
    tmp_path, reference_run, signum):
  overrides, expected, _ = reference_run
  workdir = tmp_path / 'preempted'
  process = subprocess.Popen(_command(workdir, overrides), stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True)
  # Signal once training has logged a step (the handlers are installed by then).
  metrics = workdir / 'metrics.jsonl'
  assert _wait_for(lambda: metrics.exists() and metrics.read_text().strip(), process)
  process.send_signal(signum)
  _, stderr = process.communicate(timeout=300)
  assert process.returncode == 128 + signum, stderr[-3000:]
  match = re.search(rf'{signal.Signals(signum).name} received: stopped after step (\d+) '
                    r'and saved a checkpoint of it; rerun the same command to resume', stderr)
  assert match, stderr[-3000:]
  stopped = int(match.group(1))
  assert 2 <= stopped < _STEPS
  # The checkpoint is of the step it stopped at, even between periodic saves.
  assert checkpoints.Checkpointer(str(workdir / 'checkpoints')).latest_step() == stopped

  resumed = subprocess.run(_command(workdir, overrides), capture_output=True, text=True,
                           timeout=600, check=False)
  assert resumed.returncode == 0, resumed.stderr[-4000:]
  assert f'at step {stopped}.' in resumed.stderr
  _assert_same_arrays(expected, checkpoints.state_arrays(_final_state(str(workdir))))


@pytest.mark.parametrize('kind', ['file', 'under_a_file'])
def test_bad_workdir_fails_first_naming_it(tmp_path, kind):
  blocker = tmp_path / 'not_a_dir'
  blocker.write_text('x')
  workdir = blocker if kind == 'file' else blocker / 'run'
  result = subprocess.run(_command(workdir, []), capture_output=True, text=True, timeout=300,
                          check=False)
  assert result.returncode != 0
  expected = 'is a file, not a directory' if kind == 'file' else 'cannot be created'
  assert f"--workdir='{workdir}' {expected}" in result.stderr, result.stderr[-2000:]
  assert 'Traceback' not in result.stderr


def _copy_without(reference, workdir, *steps):
  """`reference` copied to `workdir` minus the checkpoints of `steps` (as if it had been
  killed before saving them)."""
  shutil.copytree(reference, workdir)
  for step in steps:
    shutil.rmtree(workdir / 'checkpoints' / str(step))


def test_corrupted_latest_checkpoint_is_skipped_and_rerun_finishes_identically(
    tmp_path, reference_run):
  overrides, expected, reference = reference_run
  workdir = tmp_path / 'corrupted'
  shutil.copytree(reference, workdir)
  latest = workdir / 'checkpoints' / str(_STEPS)
  for array_file in (latest / 'state' / 'd').iterdir():
    with open(array_file, 'r+b') as f:
      f.truncate(array_file.stat().st_size // 2)
  resumed = subprocess.run(_command(workdir, overrides), capture_output=True, text=True,
                           timeout=600, check=False)
  assert resumed.returncode == 0, resumed.stderr[-4000:]
  assert f'checkpoint step {_STEPS} in ' in resumed.stderr and 'cannot be read' in resumed.stderr
  assert f'at step {_STEPS - 4}.' in resumed.stderr
  assert (workdir / 'checkpoints_corrupt' / str(_STEPS)).is_dir()
  _assert_same_arrays(expected, checkpoints.state_arrays(_final_state(str(workdir))))


def _assert_close_arrays(expected, actual, rtol, atol):
  leaves = jax.tree_util.tree_leaves
  for a, b in zip(leaves(expected), leaves(actual), strict=True):
    np.testing.assert_allclose(np.asarray(b, np.float64), np.asarray(a, np.float64),
                               rtol=rtol, atol=atol)


def test_checkpoint_resumes_on_another_device_count(tmp_path, reference_run):
  """Saved on 1 device, resumed on 4 (pmap); saved on 8 (pmap), resumed on 1 (jit).

  Different device counts sum the batch in a different order, so the runs agree to
  float rounding, not bit for bit."""
  overrides, expected, reference = reference_run
  four = tmp_path / 'four'
  _copy_without(reference, four, _STEPS)
  env4 = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=4')
  resumed = subprocess.run(_command(four, overrides + ['--config.parallel=pmap']), env=env4,
                           capture_output=True, text=True, timeout=600, check=False)
  assert resumed.returncode == 0, resumed.stderr[-4000:]
  assert f'at step {_STEPS - 4}. 4 device(s), parallel=pmap.' in resumed.stderr
  actual = checkpoints.state_arrays(_final_state(str(four)))
  assert int(actual['step']) == _STEPS
  _assert_close_arrays(expected['params'], actual['params'], rtol=1e-4, atol=1e-5)

  eight = tmp_path / 'eight'
  env8 = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=8')
  process = subprocess.Popen(_command(eight, overrides + ['--config.parallel=pmap',
                                                          '--config.batch_size=8',
                                                          '--config.eval_batch_size=8']),
                             env=env8, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  metrics = eight / 'metrics.jsonl'
  assert _wait_for(lambda: metrics.exists() and metrics.read_text().strip(), process)
  process.send_signal(signal.SIGTERM)
  process.communicate(timeout=300)
  stopped = checkpoints.Checkpointer(str(eight / 'checkpoints')).latest_step()
  assert process.returncode == 128 + signal.SIGTERM and 2 <= stopped < _STEPS
  resumed = subprocess.run(_command(eight, overrides + ['--config.batch_size=8',
                                                       '--config.eval_batch_size=8']),
                           capture_output=True, text=True, timeout=600, check=False)
  assert resumed.returncode == 0, resumed.stderr[-4000:]
  assert f'at step {stopped}. 1 device(s), parallel=jit.' in resumed.stderr
  assert int(checkpoints.state_arrays(_final_state(str(eight)))['step']) == _STEPS


def test_host_memory_is_flat_over_a_long_run(tmp_path, data_dir):
  """RSS after 200 steps (with evaluations and checkpoints on the way) stays within a
  small margin of RSS after 20: nothing grows per step."""
  overrides = _tiny_overrides(data_dir, 200, 50, 100) + ['--config.log_every_steps=20']
  result = subprocess.run(_command(tmp_path / 'long', overrides), capture_output=True,
                          text=True, timeout=900, check=False)
  assert result.returncode == 0, result.stderr[-4000:]
  rss = {r['step']: r['host_rss_mib']
         for r in metric_writer.read_metrics(str(tmp_path / 'long'), 'train')}
  assert sorted(rss) == list(range(20, 201, 20))
  print('host RSS (MiB) by step:', {k: round(v) for k, v in rss.items()})
  assert rss[200] - rss[20] < max(32.0, 0.05 * rss[20]), rss


@pytest.mark.parametrize('override,expected', [
    ('--config.optimizer.lr=0.1', "--config.optimizer.lr: config.optimizer has no field 'lr'; "
                                  "its fields are ['b1', 'b2'"),
    ('--config.model.name=fcn9s', "error: model.name='fcn9s' is not valid; choose one of"),
    ('--config.nonfinite=ignore', "error: config.nonfinite='ignore' is not one of"),
    ('--config.batch_size=3', 'error: config.batch_size=3 is not divisible by the 2 devices'),
])
def test_bad_config_fails_first_with_one_line(tmp_path, override, expected):
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=2')
  result = subprocess.run(_command(tmp_path / 'run', [override]), env=env, capture_output=True,
                          text=True, timeout=300, check=False)
  assert result.returncode == 1, result.stderr[-2000:]
  assert expected in result.stderr, result.stderr[-2000:]
  assert 'Traceback' not in result.stderr
  assert not (tmp_path / 'run' / 'checkpoints').exists()


def test_workdir_of_another_model_fails_naming_the_parameters(tmp_path, reference_run):
  overrides, _, reference = reference_run
  workdir = tmp_path / 'other'
  shutil.copytree(reference, workdir)
  result = subprocess.run(_command(workdir, overrides + ['--config.model.width_multiplier=0.25']),
                          capture_output=True, text=True, timeout=600, check=False)
  assert result.returncode == 1, result.stderr[-3000:]
  assert f'checkpoint step {_STEPS} in ' in result.stderr
  assert 'was written by a different model or config' in result.stderr
  # width 0.125 of ResNet-18's 64 stem channels is 8; 0.25 is 16.
  assert ('backbone/conv1/kernel (7, 7, 3, 8) in the checkpoint vs (7, 7, 3, 16) in the model'
          in result.stderr), result.stderr[-3000:]
  assert 'Traceback' not in result.stderr
  assert sorted(os.listdir(workdir / 'checkpoints')) == [str(_STEPS - 4), str(_STEPS)]
