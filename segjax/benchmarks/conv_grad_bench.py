r"""Convolution speed: XLA's own against per-tap matmuls (`layers.filter_grad_taps`,
`layers.conv_tap_matmuls`).

  python -m segjax.benchmarks.conv_grad_bench        # ~1-2 minutes on 2 CPU cores

Shapes are convs of a ResNet-50 at output stride 8 on a 2 x 320 x 320 batch (the
FCN / DeepLab benchmark rows) plus the 3x3 256->256 conv of DESIGN.md. For each:
forward, input gradient and filter gradient ('xla': jax.vjp of the plain conv; 'taps':
per-tap matmuls), and the forward and input gradient of 'tap_matmuls' (per-tap matmuls
over the valid windows; its filter gradient is the 'taps' one without the padding), as
dense-equivalent GFLOP/s (2 * B * Ho * Wo * kh * kw * C * K FLOPs each, padding
included, so skipping it shows as speed), median of `--repeats`, and the float32 matmul
peak in the same process. Prints a markdown table.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp

from segjax.benchmarks.measure import matmul_peak_gflops, median_seconds
from segjax.models import layers

# (name, batch, H, W, C, K, kernel, stride, dilation)
SHAPES = (
    ('3x3 256->256 (DESIGN.md)', 8, 64, 64, 256, 256, 3, 1, 1),
    ('res2 1x1 256->64', 2, 80, 80, 256, 64, 1, 1, 1),
    ('res2 3x3 64->64', 2, 80, 80, 64, 64, 3, 1, 1),
    ('res3 3x3 128->128', 2, 40, 40, 128, 128, 3, 1, 1),
    ('res4 3x3 256->256 d2', 2, 40, 40, 256, 256, 3, 1, 2),
    ('res5 3x3 512->512 d4', 2, 40, 40, 512, 512, 3, 1, 4),
    ('res5 1x1 2048->512', 2, 40, 40, 2048, 512, 1, 1, 1),
    ('ASPP 3x3 2048->256 d12', 2, 40, 40, 2048, 256, 3, 1, 12),
    ('ASPP 3x3 2048->256 d24', 2, 40, 40, 2048, 256, 3, 1, 24),
    ('ASPP 3x3 2048->256 d36', 2, 40, 40, 2048, 256, 3, 1, 36),
    ('stem 7x7/2 3->64', 2, 320, 320, 3, 64, 7, 2, 1),
)


def measure_shape(batch, height, width, cin, cout, k, stride, dilation, repeats=5,
                  dtype=jnp.float32):
  key_x, key_w, key_g = jax.random.split(jax.random.PRNGKey(0), 3)
  x = jax.random.normal(key_x, (batch, height, width, cin)).astype(dtype)
  w = (jax.random.normal(key_w, (k, k, cin, cout)) * 0.05).astype(dtype)
  strides, dil = (stride, stride), (dilation, dilation)
  padding = layers.torch_padding(k, dilation)
  conv = lambda x_, w_: layers._conv_nhwc(x_, w_, strides, padding, dil)  # noqa: E731
  y = conv(x, w)
  dy = jax.random.normal(key_g, y.shape).astype(dtype)
  flops = 2.0 * y.shape[0] * y.shape[1] * y.shape[2] * k * k * cin * cout
  forward = jax.jit(conv)
  input_grad = jax.jit(lambda x_, w_, g: jax.vjp(lambda a: conv(a, w_), x_)[1](g)[0])
  xla_filter = jax.jit(lambda x_, w_, g: jax.vjp(lambda b: conv(x_, b), w_)[1](g)[0])
  taps_filter = jax.jit(lambda x_, g: layers.filter_grad_taps(x_, g, w.shape, strides,
                                                              padding, dil))
  ours = lambda x_, w_: layers.conv_tap_matmuls(x_, w_, strides, padding, dil)  # noqa: E731
  ours_forward = jax.jit(ours)
  ours_input_grad = jax.jit(lambda x_, w_, g: jax.vjp(lambda a: ours(a, w_), x_)[1](g)[0])
  return {
      'forward': flops / median_seconds(lambda: forward(x, w), repeats) / 1e9,
      'forward_tap_matmuls': flops / median_seconds(lambda: ours_forward(x, w), repeats) / 1e9,
      'input_grad_tap_matmuls': flops / median_seconds(lambda: ours_input_grad(x, w, dy),
                                                       repeats) / 1e9,
      'input_grad': flops / median_seconds(lambda: input_grad(x, w, dy), repeats) / 1e9,
      'filter_grad_xla': flops / median_seconds(lambda: xla_filter(x, w, dy), repeats) / 1e9,
      'filter_grad_taps': flops / median_seconds(lambda: taps_filter(x, dy), repeats) / 1e9,
  }


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--repeats', type=int, default=5)
  parser.add_argument('--dtype', default='float32', choices=['float32', 'bfloat16'])
  parser.add_argument('--shapes', type=int, default=len(SHAPES), help='first N shapes only')
  args = parser.parse_args()
  dtype = jnp.dtype(args.dtype)
  print(f'dtype {args.dtype}')
  print(f'matmul peak (2048^2 f32): {matmul_peak_gflops():.0f} GFLOP/s\n')
  print('| conv (NHWC, HWIO) | forward xla | forward tap_matmuls | input grad xla | '
        'input grad tap_matmuls | filter grad xla | filter grad taps | taps / xla |')
  print('|---|---|---|---|---|---|---|---|')
  for name, *shape in SHAPES[:args.shapes]:
    r = measure_shape(*shape, repeats=args.repeats, dtype=dtype)
    print(f"| {name} | {r['forward']:.0f} | {r['forward_tap_matmuls']:.0f} | "
          f"{r['input_grad']:.0f} | {r['input_grad_tap_matmuls']:.0f} | "
          f"{r['filter_grad_xla']:.0f} | {r['filter_grad_taps']:.0f} | "
          f"{r['filter_grad_taps'] / r['filter_grad_xla']:.2f}x |", flush=True)


if __name__ == '__main__':
  main()
