r"""Dense CRF: time per image and agreement of the fast (lattice) and exact versions.

  python -m segjax.benchmarks.crf_bench               # ~3-5 minutes on 2 CPU cores
  python -m segjax.benchmarks.crf_bench --quick       # smaller sizes, ~1 minute

Prints a markdown report (recorded in experiments/crf/results.md):
1. fast vs exact on synthetic scenes small enough for the exact O(N^2) version:
   argmax agreement, mean / max |p_fast - p_exact|, pixel accuracy of
   unary / exact / fast against the scene's true labels.
2. seconds per image, 21 classes, 10 iterations, DeepLab's default parameters:
   fast at 512 x 512 (a smooth "natural" scene and a pure-noise worst case);
   exact at sizes where it runs, extrapolated to 512 x 512 as O(N^2).
3. the lattice's occupancy against the cells a 5-D bilateral grid would need.
4. the appearance message sum_{j != i} k(f_i, f_j) Q_j of the lattice against
   the exact sum, for 256 random pixels of the 512 x 512 scene.

The scenes: a smooth colour field with a few flat-coloured shapes whose
outlines are the true label boundaries, mild image noise, and logits that are
the true one-hot blurred (a coarse CNN's output) plus noise.
"""

from __future__ import annotations

import argparse
import math
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from segjax.models import crf

NUM_CLASSES = 21
DEFAULTS = dict(num_iterations=10, w1=4.0, theta_alpha=121.0, theta_beta=5.0, w2=3.0,
                theta_gamma=3.0)


def scene(size: int, num_classes: int = NUM_CLASSES, seed: int = 0, noise_image: bool = False):
  """(image [1, S, S, 3] 0..255, logits [1, S, S, C], labels [S, S]) at any size.

  Geometry is in relative units, so the scene looks the same at every size.
  """
  rng = np.random.default_rng(seed)
  yy, xx = np.mgrid[:size, :size] / size
  image = np.stack([128 + 90 * np.sin(3 * xx + 2 * yy), 128 + 90 * np.cos(4 * yy),
                    128 + 70 * np.sin(5 * xx * yy)], -1)
  labels = np.zeros((size, size), int)
  for k in range(1, 6):                      # five discs, each a class with its own colour
    cy, cx, r = rng.uniform(0.2, 0.8), rng.uniform(0.2, 0.8), rng.uniform(0.08, 0.2)
    inside = (yy - cy) ** 2 + (xx - cx) ** 2 < r ** 2
    labels[inside] = k
    image[inside] = rng.uniform(20, 235, 3)
  image = image + rng.normal(0, 4, image.shape)
  if noise_image:
    image = rng.uniform(0, 255, image.shape)
  one_hot = np.eye(num_classes)[labels]
  # A coarse prediction: the one-hot averaged over a box of 1/16 of the image.
  k = max(1, size // 16)
  kernel = np.ones(k) / k
  blurred = np.apply_along_axis(lambda v: np.convolve(v, kernel, 'same'), 0, one_hot)
  blurred = np.apply_along_axis(lambda v: np.convolve(v, kernel, 'same'), 1, blurred)
  logits = 4.0 * blurred + rng.normal(0, 1.0, one_hot.shape)
  image = np.clip(image, 0, 255)
  return image[None].astype(np.float32), logits[None].astype(np.float32), labels


def seconds_per_call(fn, *args, repeats: int) -> tuple[float, float]:
  """(first call incl. compile, best of `repeats` further calls), seconds."""
  start = time.perf_counter()
  jax.block_until_ready(fn(*args))
  first = time.perf_counter() - start
  best = math.inf
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    best = min(best, time.perf_counter() - start)
  return first, best


def agreement(sizes):
  print('## Fast vs exact (DeepLab defaults; theta_alpha = 121 and a local 20)\n')
  print('| size | theta_alpha | argmax agree | mean abs dp | max abs dp '
        '| acc unary | acc exact | acc fast |')
  print('|---|---|---|---|---|---|---|---|')
  for size in sizes:
    for theta_alpha in (121.0, 20.0):
      params = dict(DEFAULTS, theta_alpha=theta_alpha)
      image, logits, labels = scene(size)
      exact = np.asarray(crf.dense_crf_exact(logits, image, **params))[0]
      fast = np.asarray(crf.dense_crf_fast(logits, image, **params))[0]
      acc = lambda p: (p.argmax(-1) == labels).mean()
      print(f'| {size}x{size} | {theta_alpha:g} | {(exact.argmax(-1) == fast.argmax(-1)).mean():.4f} '
            f'| {np.abs(exact - fast).mean():.4f} | {np.abs(exact - fast).max():.3f} '
            f'| {acc(logits[0]):.4f} | {acc(exact):.4f} | {acc(fast):.4f} |')
  print()


def timing(fast_size, exact_sizes, repeats):
  print(f'## Seconds per image ({NUM_CLASSES} classes, 10 iterations, defaults)\n')
  print('| method | size | first call (compile + run) | best run |')
  print('|---|---|---|---|')
  for name, noise in (('fast', False), ('fast, noise image', True)):
    image, logits, _ = scene(fast_size, noise_image=noise)
    fn = jax.jit(lambda lg, im: crf.dense_crf_fast(lg, im, **DEFAULTS))
    first, best = seconds_per_call(fn, logits, image, repeats=repeats)
    print(f'| {name} | {fast_size}x{fast_size} | {first:.1f} | {best:.2f} |')
  per_pair = []
  for size in exact_sizes:
    image, logits, _ = scene(size)
    fn = jax.jit(lambda lg, im: crf.dense_crf_exact(lg, im, **DEFAULTS))
    first, best = seconds_per_call(fn, logits, image, repeats=repeats)
    per_pair.append(best / float(size ** 4))
    print(f'| exact | {size}x{size} | {first:.1f} | {best:.2f} |')
  n2 = float(fast_size ** 4)
  print(f'| exact, O(N^2) extrapolated from the largest size | {fast_size}x{fast_size} | '
        f'| {per_pair[-1] * n2:.0f} ({per_pair[-1] * n2 / 3600:.1f} h) |')
  print()


def occupancy(size):
  print(f'## Lattice occupancy at {size}x{size} vs a 5-D bilateral grid (defaults)\n')
  print('| image | lattice points used | lattice size compiled | N (d+1) bound '
        '| bilateral-grid cells at sigma spacing |')
  print('|---|---|---|---|---|')
  # A grid sampled once per std (coarser aliases the Gaussian: splat + slice
  # alone add 1/3 sigma^2 of variance at that spacing), plus one cell each side.
  cells = ((size / DEFAULTS['theta_alpha'] + 3) ** 2 * (255 / DEFAULTS['theta_beta'] + 3) ** 3)
  for name, noise in (('smooth scene', False), ('noise image', True)):
    image, _, _ = scene(size, noise_image=noise)
    feats = crf.appearance_features(jnp.asarray(image[0]), DEFAULTS['theta_alpha'],
                                    DEFAULTS['theta_beta'])
    num_points = int(jax.jit(lambda f: crf.lattice_vertices(f)[3])(feats))
    worst = size * size * 6
    compiled = min(s for s in (math.ceil(worst * f) for f in crf._SIZE_FRACTIONS) if s >= num_points)
    print(f'| {name} | {num_points:,} | {compiled:,} | {worst:,} | {cells:,.0f} |')
  print()


def message_error(size, num_rows=256, rows_per_chunk=16):
  print(f'## Appearance message error at {size}x{size} ({num_rows} random pixels, defaults)\n')
  print('| image | median rel. L1 error | 90th percentile | median lattice / exact mass |')
  print('|---|---|---|---|')
  for name, noise in (('smooth scene', False), ('noise image', True)):
    image, logits, _ = scene(size, noise_image=noise)
    feats = crf.appearance_features(jnp.asarray(image[0]), DEFAULTS['theta_alpha'],
                                    DEFAULTS['theta_beta'])
    q = jax.nn.softmax(jnp.asarray(logits[0].reshape(-1, NUM_CLASSES)), -1)
    rows = np.random.default_rng(0).choice(size * size, num_rows, replace=False)

    @jax.jit
    def exact_rows(feats, q):
      def chunk(r):
        k = jnp.exp(-0.5 * jnp.sum(jnp.square(feats[r][:, None] - feats[None]), -1))
        return jnp.matmul(k, q, precision=jax.lax.Precision.HIGHEST) - q[r]
      return jax.lax.map(chunk, jnp.asarray(rows).reshape(-1, rows_per_chunk)).reshape(num_rows, -1)

    @jax.jit
    def lattice_rows(feats, q):
      return crf._with_lattice(feats, lambda lat: crf.lattice_filter(lat, q))[rows] - q[rows]

    want, got = np.asarray(exact_rows(feats, q)), np.asarray(lattice_rows(feats, q))
    rel = np.abs(got - want).sum(-1) / np.abs(want).sum(-1)
    mass = got.sum(-1) / want.sum(-1)
    print(f'| {name} | {np.median(rel):.3f} | {np.percentile(rel, 90):.3f} | {np.median(mass):.3f} |')
  print()


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--quick', action='store_true', help='smaller sizes, one repeat')
  args = parser.parse_args()
  if args.quick:
    agree_sizes, fast_size, exact_sizes, repeats = (32,), 256, (32, 48), 1
  else:
    agree_sizes, fast_size, exact_sizes, repeats = (32, 64, 96), 512, (32, 64, 96), 3
  print(f'jax {jax.__version__}, {jax.devices()[0].device_kind}, {os.cpu_count()} CPUs, '
        f'load average at start {os.getloadavg()[0]:.1f}\n')
  agreement(agree_sizes)
  timing(fast_size, exact_sizes, repeats)
  occupancy(fast_size)
  message_error(fast_size)


if __name__ == '__main__':
  main()
