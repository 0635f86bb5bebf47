"""Measuring tools of the benchmark harness: step timing, A/B pairs, compile counts,
XLA cost analysis, an in-process matmul peak and resident memory.

A `Workload` is one side of a comparison (segjax or torchvision): a callable that runs
one blocking step on a fixed input, the images it processes per step and, where the
side can say, the FLOPs of one step. `alternate` times two workloads in A/B pairs in
one process, so that a change in machine load (the benchmark machines are shared)
hits both sides of a pair alike; the figure to quote is the median of the per-pair
ratios, never a ratio of numbers taken at different times.
"""

from __future__ import annotations

import dataclasses
import os
import resource
import statistics
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax import monitoring

_BACKEND_COMPILE_EVENT = '/jax/core/compile/backend_compile_duration'
# Tracing and lowering durations: with the backend compile they are the compile time.
_COMPILE_EVENTS = (_BACKEND_COMPILE_EVENT, '/jax/core/compile/jaxpr_trace_duration',
                   '/jax/core/compile/jaxpr_to_mlir_module_duration')


class CompileMonitor:
  """Counts XLA backend compilations and sums compile-phase durations, process-wide.

  jax.monitoring listeners cannot be removed one by one, so one monitor is installed
  per process (`compile_monitor()`) and callers read differences of its counters.
  """

  def __init__(self):
    self._lock = threading.Lock()
    self.backend_compiles = 0
    self.seconds = 0.0
    monitoring.register_event_duration_secs_listener(self._on_duration)

  def _on_duration(self, event: str, duration: float, **kwargs) -> None:
    if event in _COMPILE_EVENTS:
      with self._lock:
        self.seconds += duration
        if event == _BACKEND_COMPILE_EVENT:
          self.backend_compiles += 1

  def snapshot(self) -> tuple[int, float]:
    with self._lock:
      return self.backend_compiles, self.seconds


_MONITOR: CompileMonitor | None = None


def compile_monitor() -> CompileMonitor:
  global _MONITOR
  if _MONITOR is None:
    _MONITOR = CompileMonitor()
  return _MONITOR


@dataclasses.dataclass
class Workload:
  """One side of a comparison.

  step: runs one step on the workload's fixed input and blocks until it is done.
  images_per_step: images one step processes (the batch size).
  flops_per_step: FLOPs of one step (XLA cost analysis for segjax; torch's FlopCounter
    for torchvision), or None.
  cache_size: for a jitted segjax step, the number of executables its jit cache holds
    (1 when nothing recompiled).
  before_step: run, untimed, before every warm-up and timed step (e.g. to restore the
    initial training state), or None.
  """
  name: str
  step: Callable[[], Any]
  images_per_step: int
  flops_per_step: float | None = None
  cache_size: Callable[[], int] | None = None
  info: dict[str, Any] = dataclasses.field(default_factory=dict)
  before_step: Callable[[], Any] | None = None


def warm_up(workload: Workload, steps: int = 1) -> dict[str, float]:
  """Runs `steps` untimed steps; returns the first one's wall time and JAX compile time."""
  monitor = compile_monitor()
  compiles, seconds = monitor.snapshot()
  if workload.before_step is not None:
    workload.before_step()
  start = time.perf_counter()
  workload.step()
  first = time.perf_counter() - start
  for _ in range(steps - 1):
    if workload.before_step is not None:
      workload.before_step()
    workload.step()
  new_compiles, new_seconds = monitor.snapshot()
  return {'first_step_s': first, 'compile_s': new_seconds - seconds,
          'compiles': new_compiles - compiles}


def time_step(workload: Workload) -> float:
  if workload.before_step is not None:
    workload.before_step()
  start = time.perf_counter()
  workload.step()
  return time.perf_counter() - start


def median_seconds(fn: Callable[[], Any], repeats: int) -> float:
  """Median wall time of `fn()` over `repeats` calls after one warm-up call (compiles);
  a returned JAX value is waited for (`jax.block_until_ready`)."""
  jax.block_until_ready(fn())
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def summary(times: Sequence[float]) -> dict[str, float]:
  return {'median_s': statistics.median(times), 'min_s': min(times), 'max_s': max(times),
          'n': len(times)}


def alternate(a: Workload, b: Workload | None, pairs: int,
              on_pair: Callable[[int, float, float | None], None] | None = None
              ) -> dict[str, Any]:
  """Times `pairs` steps of `a` and of `b` in alternation (a, b, a, b, ...).

  Returns per-side time summaries, the backend compilations that happened during the
  timed steps (0 when nothing recompiled), and the per-pair speed ratios
  t_b / t_a (> 1: `a` is faster) with their median, min and max.
  """
  monitor = compile_monitor()
  compiles_before, _ = monitor.snapshot()
  times_a, times_b = [], []
  for i in range(pairs):
    times_a.append(time_step(a))
    if b is not None:
      times_b.append(time_step(b))
    if on_pair is not None:
      on_pair(i, times_a[-1], times_b[-1] if b is not None else None)
  compiles_after, _ = monitor.snapshot()
  result: dict[str, Any] = {'a': summary(times_a), 'times_a': times_a,
                            'compiles_during_timing': compiles_after - compiles_before}
  if b is not None:
    ratios = [tb / ta for ta, tb in zip(times_a, times_b)]
    result.update(b=summary(times_b), times_b=times_b, pair_ratios=ratios,
                  ratio_median=statistics.median(ratios), ratio_min=min(ratios),
                  ratio_max=max(ratios))
  return result


def analysed_flops(stage) -> float | None:
  """FLOPs from XLA's cost analysis of a lowered or compiled (optimized) computation;
  None where the backend gives none."""
  analysis = stage.cost_analysis()
  if isinstance(analysis, (list, tuple)):
    analysis = analysis[0] if analysis else None
  if not analysis or 'flops' not in analysis:
    return None
  return float(analysis['flops'])


def xla_flops(jitted, *args) -> float | None:
  """FLOPs of one call of `jitted` on `args` from XLA's HLO cost analysis (no compile)."""
  return analysed_flops(jitted.lower(*args))


def matmul_peak_gflops(size: int = 2048, repeats: int = 5) -> float:
  """The best f32 matmul rate (GFLOP/s) XLA reaches in this process: the MFU denominator."""
  x = jax.random.normal(jax.random.PRNGKey(0), (size, size), jnp.float32)
  matmul = jax.jit(lambda a, b: a @ b)
  matmul(x, x).block_until_ready()
  best = float('inf')
  for _ in range(repeats):
    start = time.perf_counter()
    matmul(x, x).block_until_ready()
    best = min(best, time.perf_counter() - start)
  return 2.0 * size ** 3 / best / 1e9


def rss_bytes() -> int:
  """Current resident set size of this process."""
  with open('/proc/self/statm') as f:
    return int(f.read().split()[1]) * os.sysconf('SC_PAGE_SIZE')


def peak_rss_bytes() -> int:
  """Peak resident set size (VmHWM) of this process since start or `reset_peak_rss`."""
  with open('/proc/self/status') as f:
    for line in f:
      if line.startswith('VmHWM:'):
        return int(line.split()[1]) * 1024
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def reset_peak_rss() -> bool:
  """Resets VmHWM to the current RSS (Linux `clear_refs` 5); False where not allowed."""
  try:
    with open('/proc/self/clear_refs', 'w') as f:
      f.write('5')
    return True
  except OSError:
    return False
