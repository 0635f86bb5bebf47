"""The harness's RoIAlign row: forward + backward of `roi_align` against torchvision's,
as two `Workload`s on the inputs of `roi_align_bench` (512 boxes on [2, 64, 64, 256],
7x7 bins, spatial_scale 1/4): see that module for the setting and a per-implementation
table. segjax uses `impl='auto'` (what the Mask R-CNN heads use).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from segjax.benchmarks import roi_align_bench as bench
from segjax.benchmarks.measure import Workload, xla_flops
from segjax.models.detection.roi_align import roi_align


def workloads(sampling_ratio: int = 2, impl: str = 'auto') -> tuple[Workload, Workload | None]:
  features, boxes, grad_out = bench.make_inputs()
  pool = functools.partial(roi_align, output_size=bench.OUTPUT, spatial_scale=bench.SCALE,
                           sampling_ratio=sampling_ratio, impl=impl)
  # value_and_grad: the forward output is computed too (the op is linear in the features).
  fwd_bwd = jax.jit(jax.value_and_grad(lambda f, b, g: jnp.sum(pool(f, b) * g)))
  f, b, g = jnp.asarray(features), jnp.asarray(boxes), jnp.asarray(grad_out)
  ours = Workload(name=f'segjax roi_align {impl}',
                  step=lambda: jax.block_until_ready(fwd_bwd(f, b, g)),
                  images_per_step=bench.BATCH, flops_per_step=xla_flops(fwd_bwd, f, b, g),
                  cache_size=fwd_bwd._cache_size)
  try:
    import torch
    import torchvision
  except ImportError:
    return ours, None
  from segjax.benchmarks.torchvision_workloads import set_threads
  set_threads()
  x = torch.tensor(features).permute(0, 3, 1, 2).contiguous()
  ids = np.repeat(np.arange(bench.BATCH), bench.ROIS_PER_IMAGE)[:, None].astype(np.float32)
  rois = torch.tensor(np.concatenate([ids, boxes.reshape(-1, 4)], axis=1))
  grad = torch.tensor(grad_out.reshape(-1, bench.OUTPUT, bench.OUTPUT, bench.CHANNELS)
                      ).permute(0, 3, 1, 2)

  def torch_step():
    xg = x.detach().requires_grad_()
    out = torchvision.ops.roi_align(xg, rois, bench.OUTPUT, bench.SCALE, sampling_ratio, False)
    out.backward(grad)

  theirs = Workload(name='torchvision.ops.roi_align', step=torch_step,
                    images_per_step=bench.BATCH)
  return ours, theirs
