r"""RoIAlign speed: segjax 'gather' and 'matmul' against torchvision, forward and forward+backward.

  python -m segjax.benchmarks.roi_align_bench            # ~2 minutes on 2 CPU cores
  python -m segjax.benchmarks.roi_align_bench --quick    # fewer repeats, no adaptive row
  python -m segjax.benchmarks.roi_align_bench --maps     # 'auto' on CPU: map size and FPN levels

The Mask R-CNN box-head setting: 512 boxes (2 images x 256) on a 64 x 64 x 256
feature map (stride 4 of a 256 x 256 image, spatial_scale 1/4), 7 x 7 output,
sampling_ratio 2, aligned=False, float32. Boxes are log-uniform 16..256 pixels
per side inside the image. torchvision runs NCHW with `torch.set_num_threads(2)`;
JAX uses XLA's CPU thread pool (one thread per core: 2 here). "fwd+bwd" is the
gradient of `sum(out * g)` w.r.t. the features (boxes get no gradient).

`--maps` times 'gather' against 'matmul' (sampling_ratio 2) where 'auto' weighs the map
size (`_CPU_GATHER_READ_COST` in segjax/models/detection/roi_align.py): single maps of
64, 96 and 128 pixels a side, and the four FPN levels of a 512 x 512 image (strides 4 to 32)
through `multiscale_roi_align`, with the cost ratio the rule computes and its choice.

Each time is the median of `--repeats` calls after one warm-up call (which
compiles the JAX functions). Prints a markdown table (recorded in
experiments/roi_align/results.md); compare ratios within one run, since the
machine is shared.
"""

from __future__ import annotations

import argparse
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np

from segjax.benchmarks.measure import median_seconds
from segjax.models.detection import roi_align as roi_align_lib
from segjax.models.detection.multiscale_roi_align import multiscale_roi_align
from segjax.models.detection.roi_align import roi_align

BATCH, ROIS_PER_IMAGE, SIZE, CHANNELS, OUTPUT, SCALE = 2, 256, 64, 256, 7, 0.25


def _boxes(rng, image: float):
  wh = np.exp(rng.uniform(np.log(16), np.log(image), size=(BATCH, ROIS_PER_IMAGE, 2)))
  xy = rng.uniform(0, 1, size=wh.shape) * (image - wh)
  return np.concatenate([xy, xy + wh], axis=-1).astype(np.float32)


def make_inputs(seed: int = 0):
  rng = np.random.default_rng(seed)
  image = SIZE / SCALE
  features = rng.normal(size=(BATCH, SIZE, SIZE, CHANNELS)).astype(np.float32)
  boxes = _boxes(rng, image)
  grad_out = rng.normal(size=(BATCH, ROIS_PER_IMAGE, OUTPUT, OUTPUT, CHANNELS))
  return features, boxes, grad_out.astype(np.float32)


def jax_timings(features, boxes, grad_out, impl: str, sampling_ratio: int, repeats: int):
  pool = functools.partial(roi_align, output_size=OUTPUT, spatial_scale=SCALE,
                           sampling_ratio=sampling_ratio, impl=impl)
  forward = jax.jit(lambda f, b: pool(f, b))
  # value_and_grad: the forward output is computed too (jax.grad alone would let XLA
  # drop it, since the op is linear in the features).
  backward = jax.jit(jax.value_and_grad(lambda f, b, g: jnp.sum(pool(f, b) * g)))
  f, b, g = jnp.asarray(features), jnp.asarray(boxes), jnp.asarray(grad_out)
  fwd = median_seconds(lambda: forward(f, b).block_until_ready(), repeats)
  both = median_seconds(lambda: jax.block_until_ready(backward(f, b, g)), repeats)
  return fwd, both


def torch_timings(features, boxes, grad_out, sampling_ratio: int, repeats: int):
  import torch
  import torchvision
  torch.set_num_threads(2)
  x = torch.tensor(features).permute(0, 3, 1, 2).contiguous()
  ids = np.repeat(np.arange(BATCH), ROIS_PER_IMAGE)[:, None].astype(np.float32)
  rois = torch.tensor(np.concatenate([ids, boxes.reshape(-1, 4)], axis=1))
  g = torch.tensor(grad_out.reshape(-1, OUTPUT, OUTPUT, CHANNELS)).permute(0, 3, 1, 2)

  def forward():
    with torch.no_grad():
      torchvision.ops.roi_align(x, rois, OUTPUT, SCALE, sampling_ratio, False)

  def backward():
    xg = x.detach().requires_grad_()
    out = torchvision.ops.roi_align(xg, rois, OUTPUT, SCALE, sampling_ratio, False)
    out.backward(g)

  return median_seconds(forward, repeats), median_seconds(backward, repeats)


def _grad_timings(pool, features, repeats: int):
  """Median forward and fwd+bwd seconds of `pool(features)` for both implementations."""
  times = {}
  for impl in ('gather', 'matmul'):
    fn = functools.partial(pool, impl=impl)
    forward = jax.jit(fn)
    backward = jax.jit(jax.value_and_grad(lambda f: jnp.sum(jnp.square(fn(f)))))
    times[impl] = (median_seconds(lambda: jax.block_until_ready(forward(features)), repeats),
                   median_seconds(lambda: jax.block_until_ready(backward(features)), repeats))
  return times


def map_sweep(repeats: int):
  """Rows of the `--maps` table: 'gather' vs 'matmul' where 'auto' weighs the map size."""
  rng = np.random.default_rng(1)
  cases = []
  for size in (64, 96, 128):
    features = jnp.asarray(rng.normal(size=(BATCH, size, size, CHANNELS)), jnp.float32)
    boxes = jnp.asarray(_boxes(rng, size / SCALE))
    pool = lambda f, impl, b=boxes: roi_align(f, b, OUTPUT, spatial_scale=SCALE,
                                               sampling_ratio=2, impl=impl)
    cases.append((f'{size}x{size} map', [(size, size)], pool, features))
  image = 512
  shapes = [(image // s, image // s) for s in (4, 8, 16, 32)]
  features = [jnp.asarray(rng.normal(size=(BATCH, h, w, CHANNELS)), jnp.float32)
              for h, w in shapes]
  boxes = jnp.asarray(_boxes(rng, image))
  pool = lambda f, impl: multiscale_roi_align(f, boxes, (image, image), OUTPUT,
                                              sampling_ratio=2, impl=impl)
  cases.append(('FPN levels of 512x512', shapes, pool, features))
  rows = []
  for name, maps, pool, features in cases:
    cost_ratio = roi_align_lib.matmul_to_gather_cost((2, 2), (OUTPUT, OUTPUT), maps)
    choice = roi_align_lib.resolve_impl('auto', (2, 2), (OUTPUT, OUTPUT), maps)
    rows.append((name, cost_ratio, choice, _grad_timings(pool, features, repeats)))
  return rows


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--repeats', type=int, default=5)
  parser.add_argument('--quick', action='store_true', help='3 repeats, sampling_ratio 2 only')
  parser.add_argument('--maps', action='store_true',
                      help="time 'gather' vs 'matmul' on larger maps and FPN levels")
  args = parser.parse_args()
  repeats = 3 if args.quick else args.repeats
  if args.maps:
    print(f"RoIAlign {BATCH * ROIS_PER_IMAGE} boxes, {CHANNELS} channels, {OUTPUT}x{OUTPUT}, "
          f"sampling_ratio 2; median of {repeats}; jax {jax.__version__} on "
          f"{jax.default_backend()}, {os.cpu_count()} CPUs, load average "
          f"{os.getloadavg()[0]:.1f}; rule: 'gather' when the cost ratio > "
          f"{roi_align_lib._CPU_GATHER_READ_COST}\n")
    print("| maps | matmul MACs / gather reads | 'auto' | gather fwd ms | matmul fwd ms "
          "| gather fwd+bwd ms | matmul fwd+bwd ms |")
    print('|---|---|---|---|---|---|---|')
    for name, cost_ratio, choice, t in map_sweep(repeats):
      print(f"| {name} | {cost_ratio:.0f} | {choice} | {t['gather'][0] * 1e3:.0f} | "
            f"{t['matmul'][0] * 1e3:.0f} | {t['gather'][1] * 1e3:.0f} | "
            f"{t['matmul'][1] * 1e3:.0f} |")
    return
  settings = [2] if args.quick else [1, 2, 3, 4, -1]
  features, boxes, grad_out = make_inputs()
  try:
    import torchvision  # noqa: F401
    have_torch = True
  except ImportError:
    have_torch = False

  print(f'RoIAlign {BATCH * ROIS_PER_IMAGE} boxes ({BATCH} x {ROIS_PER_IMAGE}) on '
        f'[{BATCH}, {SIZE}, {SIZE}, {CHANNELS}], {OUTPUT}x{OUTPUT} output, spatial_scale '
        f'{SCALE}; median of {repeats}; jax {jax.__version__} on {jax.default_backend()}, '
        f'{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}\n')
  print('| sampling_ratio | implementation | forward ms | fwd+bwd ms | fwd+bwd vs torchvision |')
  print('|---|---|---|---|---|')
  for sampling_ratio in settings:
    rows = []
    if have_torch:
      rows.append(('torchvision.ops.roi_align (NCHW)',
                   *torch_timings(features, boxes, grad_out, sampling_ratio, repeats)))
    # Adaptive (-1): the exact static bound here is ceil(64 / 7) = 10 samples per side,
    # (2 * 10)**2 = 400 neighbour reads per bin for 'gather'.
    for impl in ('gather', 'matmul'):
      rows.append((f"segjax '{impl}'",
                   *jax_timings(features, boxes, grad_out, impl, sampling_ratio, repeats)))
    reference = rows[0][2] if have_torch else None
    for name, fwd, both in rows:
      ratio = f'{reference / both:.2f}x faster' if reference else '-'
      if name.startswith('torchvision'):
        ratio = '1.00x'
      print(f'| {sampling_ratio} | {name} | {fwd * 1e3:.0f} | {both * 1e3:.0f} | {ratio} |')


if __name__ == '__main__':
  main()
