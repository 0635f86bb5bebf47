r"""Benchmark harness: segjax's jitted train step / inference, optionally against torchvision.

  python -m segjax.benchmark --config=configs/deeplab_v3.py:voc \
      --config.model.backbone=resnet50 --mode=train --batch_size=2 --image_size=320,320 \
      --compare=torchvision [--steps=5] [--memory] [--same_state] [--json=out.json]
  python -m segjax.benchmark --workload=roi_align --compare=torchvision
  python -m segjax.benchmark --workload=pipeline --config=configs/fcn8s.py

What it reports (recorded results and exact commands: experiments/benchmarks/README.md):
- compile time (JAX tracing + lowering + XLA compile, from jax.monitoring) separately
  from the timed steps; the timed steps are `--steps` A/B pairs, segjax then
  torchvision, alternating in one process, after `--warmup` untimed steps each (train
  steps feed their state forward; with `--same_state` each step starts, on each side,
  from that side's initial state, restored untimed: a fixed computation also for Mask
  R-CNN, whose cost follows the sampled positives);
- per side the median / min / max step time and images/s; per pair the speed ratio
  t_torchvision / t_segjax (> 1: segjax faster) and its median, min, max;
- achieved GFLOP/s from XLA's cost analysis of the jitted step (torchvision's from
  torch's FlopCounterMode) and that as a fraction of the f32 matmul rate measured in
  this process (model FLOP utilisation, MFU);
- the number of XLA compilations during the timed steps and the jit cache size (a
  step that recompiles is a bug: both must read 0 and 1);
- with `--memory`: peak RSS of the steps after the first minus the RSS after imports,
  each side in its own subprocess (one process's peak cannot be split between two
  libraries); free heap pages are returned to the OS after the first step on both
  sides (glibc `malloc_trim`, as segjax's train loop does after it compiles);
- `--workload=pipeline`: images/s of the grain input pipeline alone.

Threads: XLA's CPU client uses one thread per core; torchvision gets
`torch.set_num_threads(os.cpu_count())`. Both sides run on the same synthetic input
(segjax.benchmarks.inputs) from random weights of the same kind.
"""

from __future__ import annotations

# Before the heavy imports: the command line may restart itself with glibc's malloc set to
# keep freed memory (--host_malloc, segjax/train/host_memory.py).
import sys

from segjax.train import host_memory  # no JAX import: the restart comes first

if __name__ == '__main__':
  host_memory.configure_from_argv(sys.argv)

import json
import os
import subprocess
import time
from typing import Any

from absl import app, flags
from ml_collections import config_flags


def parse_size(text: str) -> tuple[int, int]:
  parts = [p for p in text.replace('x', ',').split(',') if p]
  if len(parts) != 2 or not all(p.strip().isdigit() and int(p) > 0 for p in parts):
    raise ValueError(f'--image_size={text!r} must be two positive integers H,W, e.g. 320,320')
  return int(parts[0]), int(parts[1])


def _default_size(config) -> tuple[int, int]:
  from segjax.benchmarks.segjax_workloads import is_instance
  return tuple(config.dataset.pad_size if is_instance(config) else config.dataset.crop_size)


def _side_report(workload, timing: dict[str, float], warm: dict[str, float],
                 peak_gflops: float | None) -> dict[str, Any]:
  report = dict(timing, images_per_s=workload.images_per_step / timing['median_s'],
                compile_s=warm['compile_s'] + workload.info.get('trace_lower_s', 0.0),
                first_step_s=warm['first_step_s'],
                flops_per_step=workload.flops_per_step, **workload.info)
  if workload.flops_per_step:
    report['gflop_per_s'] = workload.flops_per_step / timing['median_s'] / 1e9
    if peak_gflops:
      report['mfu'] = report['gflop_per_s'] / peak_gflops
  if workload.cache_size is not None:
    report['jit_cache_size'] = workload.cache_size()
  return report


def compare(ours, theirs, *, steps: int, warmup: int, matmul_peak: bool = True,
            log=print) -> dict[str, Any]:
  """Warm-up (compile) both `Workload`s, then `steps` alternating pairs; a report dict."""
  from segjax.benchmarks import measure
  if steps < 1:
    raise ValueError(f'steps={steps} must be >= 1')
  warm_ours = measure.warm_up(ours, warmup)
  log(f'{ours.name}: warm-up done ({warm_ours["first_step_s"]:.1f} s)', flush=True)
  warm_theirs = measure.warm_up(theirs, warmup) if theirs is not None else None
  # The warm-up may already have compiled everything; count from here on.
  after_warmup = measure.compile_monitor().snapshot()[0]
  peak = measure.matmul_peak_gflops() if matmul_peak else None
  def on_pair(i, a, b):
    line = f'step {i}: {ours.name} {a * 1e3:.1f} ms'
    if b is not None:
      line += f', {theirs.name} {b * 1e3:.1f} ms, ratio {b / a:.2f}'
    log(line, flush=True)

  timing = measure.alternate(ours, theirs, steps, on_pair)
  report: dict[str, Any] = {
      'steps': steps, 'matmul_peak_gflop_per_s': peak,
      'compiles_during_timing': timing['compiles_during_timing'],
      'compiles_after_warmup': measure.compile_monitor().snapshot()[0] - after_warmup,
      'load_average': os.getloadavg()[0],
      ours.name: _side_report(ours, timing['a'], warm_ours, peak),
      'segjax_times_s': timing['times_a'],
  }
  if theirs is not None:
    report[theirs.name] = _side_report(theirs, timing['b'], warm_theirs, peak)
    report.update(reference_times_s=timing['times_b'], pair_ratios=timing['pair_ratios'],
                  ratio_median=timing['ratio_median'], ratio_min=timing['ratio_min'],
                  ratio_max=timing['ratio_max'])
  return report


def run_model(config, *, mode: str, batch_size: int | None = None,
              image_size: tuple[int, int] | None = None, reference: str = 'none',
              steps: int = 5, warmup: int = 1, num_instances: int = 4,
              matmul_peak: bool = True, same_state: bool = False,
              log=print) -> dict[str, Any]:
  """Times `config`'s model (and torchvision's equivalent if `reference='torchvision'`).

  `same_state` (train): every step, on each side, starts from that side's initial state.
  """
  if same_state and mode != 'train':
    raise ValueError(f'same_state=True is for train steps; mode={mode!r}')
  from segjax.benchmarks import segjax_workloads
  batch_size = batch_size or config.batch_size
  image_size = tuple(image_size or _default_size(config))
  config = segjax_workloads.prepare_config(config, batch_size, image_size)
  if reference == 'torchvision':
    from segjax.benchmarks import torchvision_workloads
    torchvision_workloads.equivalent(config)  # fail before anything is compiled
  batch = segjax_workloads.make_batch(config, batch_size, image_size, num_instances)
  ours = segjax_workloads.workload(config, mode, batch, same_state=same_state)
  theirs = None
  if reference == 'torchvision':
    theirs = torchvision_workloads.workload(config, mode, batch, same_state=same_state)
  elif reference == 'xla_conv_grad':
    theirs = _with_conv_grad(
        lambda: segjax_workloads.workload(config, mode, batch, name='segjax_xla_conv_grad',
                                          same_state=same_state),
        'xla')
  report = compare(ours, theirs, steps=steps, warmup=warmup, matmul_peak=matmul_peak, log=log)
  report.update(model=config.model.name, backbone=config.model.get('backbone'),
                dtype=config.model.get('dtype'), mode=mode, batch_size=batch_size,
                image_size=list(image_size), same_state=same_state)
  return report


def _with_conv_grad(build, impl: str):
  """`build()`'s Workload with every trace (build and steps) under conv_weight_grad(impl)."""
  from segjax.models import layers
  with layers.conv_weight_grad(impl):
    workload = build()
  step = workload.step

  def step_under_impl():
    with layers.conv_weight_grad(impl):
      return step()
  workload.step = step_under_impl
  workload.info['conv_weight_grad'] = impl
  return workload


def run_pipeline(config, *, steps: int = 20, warmup: int = 1,
                 train_step: bool = False) -> dict[str, Any]:
  """Images/s of `config`'s train input pipeline alone (`pipeline_bench`); with
  `train_step`, also of the config's train step on batches of the same shape, timed
  after it in this process, and the ratio pipeline / step (the issue asks >= 10)."""
  from segjax.benchmarks import pipeline_bench
  report = pipeline_bench.measure(config, batches=max(steps, 5))
  if train_step:
    step = run_model(config, mode='train', batch_size=config.batch_size,
                     image_size=tuple(config.dataset.crop_size), steps=steps, warmup=warmup,
                     matmul_peak=False)
    report['train_step_images_per_s'] = step['segjax']['images_per_s']
    report['pipeline_over_train_step'] = (report['images_per_s']
                                          / report['train_step_images_per_s'])
    report['load_average'] = os.getloadavg()[0]
  return report


def memory_side(config, side: str, *, mode: str, batch_size: int | None,
                image_size: tuple[int, int] | None, steps: int, num_instances: int
                ) -> dict[str, Any]:
  """Peak RSS of one side's steps minus the RSS after imports (this process only)."""
  import jax
  from segjax.benchmarks import measure, segjax_workloads
  if side == 'torchvision':
    import torch  # noqa: F401
    import torchvision  # noqa: F401
  jax.devices()
  baseline = measure.rss_bytes()
  batch_size = batch_size or config.batch_size
  image_size = tuple(image_size or _default_size(config))
  config = segjax_workloads.prepare_config(config, batch_size, image_size)
  batch = segjax_workloads.make_batch(config, batch_size, image_size, num_instances)
  if side == 'segjax':
    workload = segjax_workloads.workload(config, mode, batch)
  else:
    from segjax.benchmarks import torchvision_workloads
    workload = torchvision_workloads.workload(config, mode, batch, count_flops=False)
  workload.step()
  with_compile = measure.peak_rss_bytes() - baseline
  after_warmup = measure.rss_bytes() - baseline
  # Both sides: free heap pages go back to the OS before the steady-state steps, as
  # segjax's train loop does after its compiling step (`host_memory`).
  released = host_memory.release_free_heap()
  after_release = measure.rss_bytes() - baseline
  reset = measure.reset_peak_rss()
  for _ in range(steps):
    workload.step()
  steady = measure.peak_rss_bytes() - baseline
  return {'side': side, 'baseline_rss_mb': baseline / 2**20,
          'peak_minus_import_mb': steady / 2**20 if reset else None,
          'peak_minus_import_with_compile_mb': with_compile / 2**20,
          'rss_after_warmup_mb': after_warmup / 2**20,
          'rss_after_heap_release_mb': after_release / 2**20 if released else None}


def measure_memory(argv: list[str], sides=('segjax', 'torchvision')) -> dict[str, Any]:
  """Runs this command again once per side with --memory_side; their results."""
  base = [a for a in argv[1:] if not a.startswith(('--memory', '--json', '--compare'))]
  results = {}
  for side in sides:
    cmd = [sys.executable, '-m', 'segjax.benchmark', *base, f'--memory_side={side}']
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    lines = [l for l in proc.stdout.splitlines() if l.startswith('MEMORY_JSON ')]
    if proc.returncode or not lines:
      raise RuntimeError(f'memory run of {side} failed:\n{proc.stderr[-3000:]}')
    results[side] = json.loads(lines[-1][len('MEMORY_JSON '):])
  ours = results['segjax']['peak_minus_import_mb']
  theirs = results.get('torchvision', {}).get('peak_minus_import_mb')
  if ours and theirs:
    results['ratio'] = ours / theirs  # segjax / torchvision: <= 1 is the target
  return results


def _print_summary(report: dict[str, Any]) -> None:
  names = [k for k, v in report.items() if isinstance(v, dict) and 'median_s' in v]
  print('\n| side | median ms | min ms | max ms | img/s | compile s | GFLOP/step | '
        'GFLOP/s | MFU |')
  print('|---|---|---|---|---|---|---|---|---|')
  for name in names:
    r = report[name]
    flops = r.get('flops_per_step')
    print(f"| {name} | {r['median_s'] * 1e3:.1f} | {r['min_s'] * 1e3:.1f} | "
          f"{r['max_s'] * 1e3:.1f} | {r['images_per_s']:.2f} | {r['compile_s']:.1f} | "
          f"{flops / 1e9 if flops else float('nan'):.1f} | {r.get('gflop_per_s', float('nan')):.1f} | "
          f"{r.get('mfu', float('nan')):.2f} |")
  if 'ratio_median' in report:
    print(f"\nspeed ratio: {names[-1]} time / {names[0]} time, median of {report['steps']} pairs: "
          f"{report['ratio_median']:.2f} (min {report['ratio_min']:.2f}, max "
          f"{report['ratio_max']:.2f}); > 1 means {names[0]} is faster")
  print(f"matmul peak {report.get('matmul_peak_gflop_per_s') or float('nan'):.0f} GFLOP/s; "
        f"XLA compilations during timed steps: {report['compiles_during_timing']}; "
        f"load average {report['load_average']:.1f}")


def main(argv):
  from segjax.models import layers
  config = _CONFIG.value
  retained = host_memory.retained_by_environment()
  if _STEPS.value < 5 and not _MEMORY_SIDE.value:
    print(f'note: --steps={_STEPS.value} < 5; the issue asks for at least 5 timed steps')
  size = parse_size(_SIZE.value) if _SIZE.value else None
  # The flag, else the config's choice (both default to 'auto': tap_matmuls on CPU).
  conv_grad = _CONV_GRAD.value or (config.conv_weight_grad if config is not None else 'auto')
  context = layers.conv_weight_grad(conv_grad)
  if _WORKLOAD.value != 'roi_align' and config is None:
    raise app.UsageError(f'--workload={_WORKLOAD.value} needs --config=configs/X.py[:preset]')
  allowed = (('none', 'train_step') if _WORKLOAD.value == 'pipeline'
             else ('none', 'torchvision', 'xla_conv_grad'))
  if _COMPARE.value not in allowed:
    raise app.UsageError(f'--compare={_COMPARE.value} with --workload={_WORKLOAD.value}: '
                         f'choose one of {allowed}')
  with context:
    if _MEMORY_SIDE.value:
      result = memory_side(config, _MEMORY_SIDE.value, mode=_MODE.value,
                           batch_size=_BATCH.value, image_size=size, steps=_STEPS.value,
                           num_instances=_INSTANCES.value)
      print('MEMORY_JSON ' + json.dumps(result))
      return
    start = time.time()
    if _WORKLOAD.value == 'pipeline':
      if _BATCH.value:
        config.batch_size = _BATCH.value
      if size:
        config.dataset.crop_size = size
      report = run_pipeline(config, steps=_STEPS.value, warmup=_WARMUP.value,
                            train_step=_COMPARE.value == 'train_step')
      print(json.dumps(report, indent=1))
    elif _WORKLOAD.value == 'roi_align':
      from segjax.benchmarks import roi_align_row
      ours, theirs = roi_align_row.workloads(_SAMPLING.value)
      report = compare(ours, theirs if _COMPARE.value == 'torchvision' else None,
                       steps=_STEPS.value, warmup=_WARMUP.value)
      _print_summary(report)
    else:
      report = run_model(config, mode=_MODE.value, batch_size=_BATCH.value, image_size=size,
                         reference=_COMPARE.value, steps=_STEPS.value, warmup=_WARMUP.value,
                         num_instances=_INSTANCES.value, same_state=_SAME_STATE.value)
      if _MEMORY.value:
        report['memory'] = measure_memory(
            sys.argv, ('segjax', 'torchvision') if _COMPARE.value == 'torchvision' else ('segjax',))
      _print_summary(report)
      if 'memory' in report:
        m = report['memory']
        print('peak RSS minus import: ' + ', '.join(
            f"{side} {m[side]['peak_minus_import_mb'] or float('nan'):.0f} MB"
            for side in ('segjax', 'torchvision') if side in m)
            + f", ratio {m.get('ratio', float('nan')):.2f} (<= 1: segjax uses less)")
    report['command'] = ' '.join(['python -m segjax.benchmark', *sys.argv[1:]])
    report['conv_weight_grad'] = layers.resolve_conv_weight_grad(conv_grad)
    report['host_malloc'] = {'flag': _HOST_MALLOC.value, 'retained': retained}
    report['wall_s'] = time.time() - start
  if _JSON.value:
    os.makedirs(os.path.dirname(os.path.abspath(_JSON.value)), exist_ok=True)
    with open(_JSON.value, 'w') as f:
      json.dump(report, f, indent=1, default=str)


if __name__ == '__main__':
  # Flags exist only when this module is the program: importing it next to another
  # segjax command line (tests do) must not define the same absl flag twice.
  _CONFIG = config_flags.DEFINE_config_file('config', None, 'A config file, e.g. configs/deeplab_v3.py:voc')
  _WORKLOAD = flags.DEFINE_enum('workload', 'model', ['model', 'roi_align', 'pipeline'],
                                'What to time: the config\'s model, RoIAlign fwd+bwd, or the '
                                'input pipeline of the config\'s dataset.')
  _MODE = flags.DEFINE_enum('mode', 'train', ['train', 'infer'], 'Train step or inference.')
  _BATCH = flags.DEFINE_integer('batch_size', None, 'Images per step (default: the config\'s).')
  _SIZE = flags.DEFINE_string('image_size', None, 'H,W (default: the config\'s crop/pad size).')
  _COMPARE = flags.DEFINE_enum('compare', 'none',
                               ['none', 'torchvision', 'xla_conv_grad', 'train_step'],
                               'Reference to run A/B: torchvision\'s equivalent model, or segjax '
                               'itself with XLA\'s conv filter gradient (to measure '
                               '--conv_weight_grad); with --workload=pipeline, train_step '
                               'also times the config\'s train step on batches of the same '
                               'shape and reports pipeline / step images per second.')
  _STEPS = flags.DEFINE_integer('steps', 5, 'Timed steps (pairs with --compare); at least 5.')
  _WARMUP = flags.DEFINE_integer('warmup', 1, 'Untimed steps per side before timing.')
  _INSTANCES = flags.DEFINE_integer('num_instances', 4, 'Ground-truth objects per image (detectors).')
  _SAME_STATE = flags.DEFINE_bool(
      'same_state', False, 'Train rows: restore each side\'s initial state (untimed) before '
      'every step, so that every step is the same computation even where its cost depends on '
      'the training state (Mask R-CNN: the sampled positives).')
  _SAMPLING = flags.DEFINE_integer('roi_sampling_ratio', 2, 'RoIAlign row: sampling_ratio.')
  _MEMORY = flags.DEFINE_bool('memory', False, 'Also measure peak RSS minus import per side '
                              '(one subprocess each).')
  _MEMORY_SIDE = flags.DEFINE_enum('memory_side', None, ['segjax', 'torchvision'],
                                   'Internal: measure one side\'s memory in this process.')
  _CONV_GRAD = flags.DEFINE_string('conv_weight_grad', None, 'how segjax computes convs: '
                                   'see segjax.models.layers.CONV_WEIGHT_GRADS (default: the config\'s, '
                                   'else \'auto\').')
  _JSON = flags.DEFINE_string('json', None, 'Write all results to this JSON file.')
  _HOST_MALLOC = flags.DEFINE_enum(
      'host_malloc', 'auto', host_memory.MODES,
      host_memory.FLAG_HELP + ' Applies to both sides of a comparison (one process).')
  app.run(main)
