"""Multi-process training on one machine: `python -m segjax.main` as 2 JAX processes
(jax.distributed, gloo CPU collectives) x 2 simulated CPU devices each, against
1 process x 4 devices with the same global batch.

Every run uses plain SGD: Adam's g / sqrt(v) turns float-rounding differences in
near-zero gradients into learning-rate-sized steps, which would compare rounding
rather than the runs (as in parallel_equivalence_run.py).
"""

import importlib.util
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from segjax import distributed
from segjax.data import pipeline
from segjax.train import checkpoints, metric_writer, trainer

_CONFIG = os.path.join(os.path.dirname(__file__), '..', 'configs', 'fcn8s.py')
pytestmark = pytest.mark.slow

# torchvision's stride-4 stem, not the preset's stride-1 one (16x the backbone compute):
# these tests are about the loop, the CLI and checkpoints, not the architecture.
_TINY = {'dataset.name': 'digit_scenes/tiny', 'model.backbone': 'resnet18',
         'model.stem_stride': 4,
         'model.width_multiplier': 0.125, 'dataset.crop_size': (32, 32),
         'optimizer.name': 'sgd', 'optimizer.learning_rate': 0.02}
_STEPS = 8
# Float tolerance for 2 processes vs 1: the same sums, reduced in another order.
_PARAM_ATOL = 1e-4


def _overrides(data_dir, parallel):
  return [
      *(f'--config.{field}={value}' for field, value in _TINY.items()),
      f'--config.dataset.data_dir={data_dir}', '--config.batch_size=16',
      '--config.eval_batch_size=4', f'--config.num_train_steps={_STEPS}',
      '--config.checkpoint_every_steps=2', f'--config.eval_every_steps={_STEPS}',
      '--config.log_every_steps=2', '--config.optimizer.warmup_steps=2',
      '--config.eval.tta.scales=(1.0,)',  # one test scale: these runs test the loop
      f'--config.parallel={parallel}',
  ]


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _env(num_devices):
  return {**os.environ, 'XLA_FLAGS': f'--xla_force_host_platform_device_count={num_devices}'}


def _launch(workdir, overrides, num_processes=2):
  """Starts the processes of one run; -> (Popens, their log paths)."""
  command = [sys.executable, '-m', 'segjax.main', f'--config={_CONFIG}',
             f'--workdir={workdir}', *overrides]
  if num_processes > 1:
    command.append(f'--coordinator_address=127.0.0.1:{_free_port()}')
    command.append(f'--num_processes={num_processes}')
  processes, logs = [], []
  for i in range(num_processes):
    log = f'{workdir}.{i}.log' if num_processes > 1 else f'{workdir}.log'
    with open(log, 'a') as f:
      extra = [f'--process_id={i}'] if num_processes > 1 else []
      processes.append(subprocess.Popen(command + extra, stdout=f, stderr=subprocess.STDOUT,
                                        env=_env(4 // num_processes)))
    logs.append(log)
  return processes, logs


def _finish(processes, logs, timeout=600):
  """Waits for every process; one that fails ends the others (they would wait for it)."""
  deadline = time.time() + timeout
  try:
    while (time.time() < deadline and any(p.poll() is None for p in processes)
           and not any(p.poll() for p in processes)):
      time.sleep(0.2)
  finally:
    for p in processes:
      if p.poll() is None:
        p.kill()
        p.wait()
  texts = [open(log).read() for log in logs]
  assert [p.returncode for p in processes] == [0] * len(processes), '\n'.join(
      text[-3000:] for text in texts)
  return texts


def _final_mious(text):
  """The 'final eval' line's (mIoU, pixel accuracy) as logged."""
  return re.findall(r'final eval: miou=([0-9.]+) pixel_accuracy=([0-9.]+)', text)


def _final_state(workdir):
  spec = importlib.util.spec_from_file_location('fcn8s', _CONFIG)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  for field, value in _TINY.items():
    section, name = field.split('.')
    config[section][name] = value
  template = trainer.create_state(config)
  state, _ = checkpoints.Checkpointer(os.path.join(workdir, 'checkpoints')).restore(template)
  return checkpoints.state_arrays(state)


def _max_abs_diff(a, b):
  leaves = jax.tree_util.tree_leaves
  return max(float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64))))
             for x, y in zip(leaves(a), leaves(b), strict=True))


@pytest.fixture(scope='module')
def reference(tmp_path_factory):
  """1 process x 4 devices (jit): (data_dir, final state arrays, metrics records, mIoU text).

  It also builds the dataset, which the 2-process runs then only read."""
  data_dir = str(tmp_path_factory.mktemp('tfds'))
  workdir = str(tmp_path_factory.mktemp('one_process') / 'run')
  (text,) = _finish(*_launch(workdir, _overrides(data_dir, 'jit'), num_processes=1))
  return data_dir, _final_state(workdir), metric_writer.read_metrics(workdir, 'train'), \
      _final_mious(text)


def _assert_matches_reference(workdir, texts, reference, resumed_at=()):
  """`resumed_at`: steps a rerun resumed from; a train record whose logging window
  spans one averages fewer steps, so its loss is not compared."""
  _, expected, expected_train, expected_miou = reference
  mious = [_final_mious(text) for text in texts]
  # Every process reports the global confusion matrix's numbers (each one evaluates
  # half of the images), and they are the single-process ones.
  assert len(mious[0]) == 1 and mious[0] == mious[1], mious
  np.testing.assert_allclose(np.asarray(mious[0], float), np.asarray(expected_miou, float),
                             atol=2e-4)
  train = metric_writer.read_metrics(workdir, 'train')
  assert [r['step'] for r in train] == [r['step'] for r in expected_train]
  whole = [i for i, r in enumerate(train)
           if not any(r['step'] - 2 < start < r['step'] for start in resumed_at)]
  assert len(whole) >= 3, whole
  np.testing.assert_allclose([train[i]['loss'] for i in whole],
                             [expected_train[i]['loss'] for i in whole], rtol=1e-4)
  diff = _max_abs_diff(expected['params'], _final_state(workdir)['params'])
  losses = [(train[i]['loss'], expected_train[i]['loss']) for i in whole]
  print(f'\nmax |param diff| 2 processes x 2 devices vs 1 x 4: {diff:.3g}; (mIoU, pixel '
        f'accuracy) {mious} vs {expected_miou}; (loss, 1-process loss) {losses}')
  assert diff < _PARAM_ATOL
  # metrics.jsonl and config.json come from process 0 alone: one record per step.
  assert len({r['step'] for r in train}) == len(train)


def test_two_processes_train_like_one(tmp_path, reference):
  workdir = str(tmp_path / 'run')
  texts = _finish(*_launch(workdir, _overrides(reference[0], 'jit')))
  for i, text in enumerate(texts):
    assert f'JAX process {i} of 2: 2 local device(s), 4 in all.' in text
  _assert_matches_reference(workdir, texts, reference)


def _wait_for_checkpoint(checkpoint_dir, processes, after=0):
  """Returns once a finished checkpoint of a step > `after` exists (or a process ended)."""
  deadline = time.time() + 400
  while time.time() < deadline and all(p.poll() is None for p in processes):
    if os.path.isdir(checkpoint_dir) and any(
        name.isdigit() and int(name) > after for name in os.listdir(checkpoint_dir)):
      return
    time.sleep(0.05)


def test_killed_two_process_run_resumes(tmp_path, reference):
  """pmap driver. SIGTERM to process 1 only: both save the same step and stop. Then
  SIGKILL both once a later checkpoint exists, and rerun both to the end."""
  workdir = str(tmp_path / 'run')
  overrides = _overrides(reference[0], 'pmap')
  checkpoint_dir = os.path.join(workdir, 'checkpoints')
  processes, logs = _launch(workdir, overrides)
  _wait_for_checkpoint(checkpoint_dir, processes)
  processes[1].send_signal(signal.SIGTERM)
  for p in processes:
    p.wait(timeout=300)
  assert [p.returncode for p in processes] == [128 + signal.SIGTERM] * 2
  stopped = [re.findall(r'SIGTERM received: stopped after step (\d+)', open(log).read())
             for log in logs]
  assert stopped[0] == stopped[1] and len(stopped[0]) == 1, stopped
  stopped_at = int(stopped[0][0])
  assert checkpoints.Checkpointer(checkpoint_dir).latest_step() == stopped_at < _STEPS

  processes, logs = _launch(workdir, overrides)
  _wait_for_checkpoint(checkpoint_dir, processes, after=stopped_at)
  for p in processes:
    p.send_signal(signal.SIGKILL)
  for p in processes:
    p.wait()
  assert [p.returncode for p in processes] == [-signal.SIGKILL] * 2
  saved = checkpoints.Checkpointer(checkpoint_dir).latest_step()
  assert saved is not None and stopped_at < saved < _STEPS, (stopped_at, saved)

  texts = _finish(*_launch(workdir, overrides))
  for text in texts:
    resumed = [int(s) for s in re.findall(r'Resumed from .* at step (\d+)', text)]
    assert resumed and resumed[-1] == saved, resumed
  _assert_matches_reference(workdir, [t.split('Resumed from')[-1] for t in texts], reference,
                            resumed_at=(stopped_at, saved))


def test_initialize_names_a_missing_or_bad_value():
  with pytest.raises(ValueError, match='needs --num_processes, --process_id'):
    distributed.initialize('manual', coordinator_address='127.0.0.1:1234')
  with pytest.raises(ValueError, match=r'--process_id=2 must be in \[0, --num_processes=2\)'):
    distributed.initialize('manual', coordinator_address='127.0.0.1:1234', num_processes=2,
                           process_id=2)
  with pytest.raises(ValueError, match=r"\['process_id'\] given with --distributed=off"):
    distributed.initialize('off', process_id=0)
  with pytest.raises(ValueError, match="'slurm' is not one of"):
    distributed.initialize('slurm')


def test_process_batches_are_slices_of_the_one_process_batch(reference):
  config = pipeline.default_dataset_config()
  config.name, config.data_dir = 'digit_scenes/tiny', reference[0]
  config.crop_size, config.scale_range = (32, 32), (0.75, 1.25)

  def batches(process_index, process_count, count=12):  # 48 examples: past one epoch (40)
    loader = pipeline.create_train_loader(config, global_batch_size=4, seed=0,
                                          process_index=process_index,
                                          process_count=process_count)
    iterator = iter(loader)
    return [next(iterator) for _ in range(count)]

  one, first, second = batches(0, 1), batches(0, 2), batches(1, 2)
  for whole, a, b in zip(one, first, second):
    assert a['image'].shape[0] == b['image'].shape[0] == 2
    for key in whole:
      np.testing.assert_array_equal(whole[key], np.concatenate([a[key], b[key]]))


def test_detection_outputs_stay_per_process_and_results_are_gathered():
  script = os.path.join(os.path.dirname(__file__), 'multihost_run.py')
  address = f'127.0.0.1:{_free_port()}'
  processes = [subprocess.Popen([sys.executable, script, address, str(i)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
               for i in range(2)]
  outputs = [p.communicate(timeout=300) for p in processes]
  assert [p.returncode for p in processes] == [0, 0], [err[-3000:] for _, err in outputs]
  reports = [json.loads(out.strip().splitlines()[-1]) for out, _ in outputs]
  for i, report in enumerate(reports):
    assert report['process'] == i
    images = np.arange(8).reshape(2, 4) + 100 * i
    assert report['boxes'] == (images * 2).tolist()  # this process's rows only
    assert report['num_detections'] == [1 + 10 * i, 2 + 10 * i]
    # Every process holds every process's results, process 0's first.
    assert report['gathered'] == [[0, 'rle'], [10, 'rle'], [11, 'rlerle']]
