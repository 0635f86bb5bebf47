"""Images per second of the grain input pipeline alone (no model): the train loader of a
config's dataset (`segjax.data.pipeline` or, for detectors, `instance_pipeline`), the
batches it yields pulled as fast as possible on the host.

The first batch (reader start-up, first file opens, worker processes starting) is
timed separately; the rate is the images of `batches` further batches over their total
time. Not the median batch time: with worker processes (`dataset.num_workers`) some
batches are already waiting in the workers' buffers and take ~0 s, and a median of
such a mix overstates the rate. The dataset must be built already
(digit_scenes builds itself on first use of the trainer).
"""

from __future__ import annotations

import statistics
import time

import ml_collections


def measure(config: ml_collections.ConfigDict, batches: int = 20) -> dict[str, float]:
  from segjax.benchmarks.segjax_workloads import is_instance
  if is_instance(config):
    from segjax.data import instance_pipeline as pipeline
  else:
    from segjax.data import pipeline
  loader = pipeline.create_train_loader(config.dataset, global_batch_size=config.batch_size,
                                        seed=config.seed)
  iterator = iter(loader)
  start = time.perf_counter()
  batch = next(iterator)
  first = time.perf_counter() - start
  images = batch['image'].shape[0]
  times = []
  for _ in range(batches):
    start = time.perf_counter()
    next(iterator)
    times.append(time.perf_counter() - start)
  median = statistics.median(times)
  return {'images_per_batch': images, 'first_batch_s': first, 'median_s': median,
          'min_s': min(times), 'max_s': max(times), 'total_s': sum(times),
          'images_per_s': images * len(times) / sum(times),
          'image_shape': list(batch['image'].shape[1:]), 'num_workers': config.dataset.num_workers}
