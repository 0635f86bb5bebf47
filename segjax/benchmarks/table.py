"""Markdown table of benchmark JSON files (`python -m segjax.benchmark ... --json=F`).

  python -m segjax.benchmarks.table experiments/benchmarks/results/*.json
"""

from __future__ import annotations

import json
import sys

_REFERENCES = ('torchvision', 'torchvision.ops.roi_align', 'segjax_xla_conv_grad')


def row(path: str) -> str | None:
  with open(path) as f:
    r = json.load(f)
  if 'images_per_s' in r and 'median_s' in r:  # the input pipeline
    return (f"| pipeline {tuple(r['image_shape'])} | {r['images_per_s']:.0f} img/s | - | - | "
            f"{r['median_s'] * 1e3:.1f} ms/batch of {r['images_per_batch']} | "
            f"`{r.get('command', '')}` |")
  if 'ratio_median' not in r:
    return None
  ours = next(k for k, v in r.items() if isinstance(v, dict) and 'median_s' in v
              and k not in _REFERENCES)
  ref = next(k for k in _REFERENCES if k in r)
  a, b = r[ours], r[ref]
  what = r.get('model', ours)
  if 'mode' in r:
    what = f"{r['model']} {r['mode']} {r['batch_size']}x{r['image_size'][0]}x{r['image_size'][1]}"
  extra = f"compile {a['compile_s']:.0f} s"
  if a.get('gflop_per_s'):
    extra += f", {a['gflop_per_s']:.0f} GFLOP/s"
  if a.get('mfu') is not None:
    extra += f", MFU {a['mfu']:.2f}"
  return (f"| {what} | {a['median_s'] * 1e3:.0f} ms ({a['min_s'] * 1e3:.0f}-"
          f"{a['max_s'] * 1e3:.0f}) | {b['median_s'] * 1e3:.0f} ms ({b['min_s'] * 1e3:.0f}-"
          f"{b['max_s'] * 1e3:.0f}) | **{r['ratio_median']:.2f}** ({r['ratio_min']:.2f}-"
          f"{r['ratio_max']:.2f}) | {extra}; load {r['load_average']:.0f} | "
          f"`{r.get('command', '')}` |")


def main(paths):
  print('| workload | segjax median (min-max) | reference median (min-max) | '
        'ratio ref/segjax, median of pairs (min-max) | notes | command |')
  print('|---|---|---|---|---|---|')
  for path in paths:
    line = row(path)
    if line:
      print(line)


if __name__ == '__main__':
  main(sys.argv[1:])
