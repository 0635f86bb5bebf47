"""XLA CPU convolution gradients inside control flow, and the transposed conv's kernel gradient.

  python -m segjax.benchmarks.nested_conv_bench      # ~1-2 minutes on 2 cores

Two measurements behind the Mask R-CNN train step (experiments/benchmarks/README.md):
1. A 3x3 256->256 conv on 16 RoIs of 14x14 (Mask R-CNN's mask head), forward +
   gradients: plain, inside a `lax.switch` branch (the mask-slot buckets), inside a
   `lax.scan` body, and inside the switch with per-tap matmul filter gradients
   (`layers.conv_weight_grad('taps')`).
2. The 2x2 stride-2 transposed conv of `conv5_mask` on 128 RoIs: forward + kernel
   gradient of the plain input-dilated lax conv against `layers.conv_transpose_torch`
   (per-tap matmul kernel gradient).
Prints a markdown table of median milliseconds.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from segjax.benchmarks.measure import median_seconds
from segjax.models import layers

_NHWC = ('NHWC', 'HWIO', 'NHWC')


def _median_ms(fn, *args) -> float:
  return 1e3 * median_seconds(lambda: fn(*args), repeats=3)


def _conv(x, w, taps: bool):
  if taps:
    return layers.conv_general_dilated_taps(x, w, (1, 1), ((1, 1), (1, 1)),
                                            dimension_numbers=_NHWC)
  return jax.lax.conv_general_dilated(x, w, (1, 1), ((1, 1), (1, 1)), dimension_numbers=_NHWC)


def conv_rows(rois: int = 16) -> list[tuple[str, float]]:
  """(setting, ms) of a 3x3x256 conv's forward + filter and input gradients on rois x 14x14."""
  x = jax.random.normal(jax.random.key(0), (128, 14, 14, 256))
  w = jax.random.normal(jax.random.key(1), (3, 3, 256, 256)) * 0.02

  def loss(w, x, n, taps=False):
    return jnp.sum(_conv(x[:n], w, taps) ** 2)

  def switched(w, x, i, taps=False):
    branches = [functools.partial(loss, n=n, taps=taps) for n in (rois, 128)]
    return jax.lax.switch(i, branches, w, x)

  def scanned(w, x):
    body = lambda c, xi: (c + loss(w, xi, rois), None)
    return jax.lax.scan(body, 0.0, x[None, :rois])[0]

  grad = lambda f: jax.jit(jax.grad(f, argnums=(0, 1)))
  first = jnp.int32(0)
  return [
      ('plain', _median_ms(grad(functools.partial(loss, n=rois)), w, x)),
      ('inside lax.switch', _median_ms(grad(switched), w, x, first)),
      ('inside lax.scan', _median_ms(grad(scanned), w, x)),
      ("inside lax.switch, 'taps' filter gradient",
       _median_ms(grad(functools.partial(switched, taps=True)), w, x, first)),
  ]


def deconv_rows(rois: int = 128) -> list[tuple[str, float]]:
  """(setting, ms) of conv5_mask's forward + kernel gradient on rois x 14x14x256."""
  x = jax.random.normal(jax.random.key(0), (rois, 14, 14, 256))
  k = jax.random.normal(jax.random.key(1), (2, 2, 256, 256)) * 0.02
  plain = lambda k, x: jnp.sum(layers._conv_transpose_lax(x, k, 2, 0) ** 2)  # pylint: disable=protected-access
  taps = lambda k, x: jnp.sum(layers.conv_transpose_torch(x, k, 2, 0) ** 2)
  return [('lax conv (input dilation), XLA kernel gradient', _median_ms(jax.jit(jax.grad(plain)), k, x)),
          ('conv_transpose_torch, per-tap kernel gradient', _median_ms(jax.jit(jax.grad(taps)), k, x))]


def main() -> None:
  print(f'jax {jax.__version__} on {jax.default_backend()}, {jax.device_count()} device(s)')
  print('\n| 3x3 256->256 conv, 16 RoIs of 14x14, forward + gradients | median ms |\n|---|---|')
  for name, ms in conv_rows():
    print(f'| {name} | {ms:.0f} |')
  print('\n| conv5_mask 2x2 stride-2 transposed conv, 128 RoIs, forward + kernel gradient '
        '| median ms |\n|---|---|')
  for name, ms in deconv_rows():
    print(f'| {name} | {ms:.0f} |')


if __name__ == '__main__':
  main()
