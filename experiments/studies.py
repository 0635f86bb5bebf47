"""Ablation studies on digit_scenes: run variants through `segjax.main`, tabulate, plot.

  python experiments/studies.py STUDY [--outdir=DIR] [--seeds=0,1] [--only=LABEL,...]
  python experiments/studies.py STUDY --plot_only      # redraw from the committed JSON

Each variant is one `python -m segjax.main --config=C --workdir=OUTDIR/STUDY/LABEL/seedS
--config.seed=S OVERRIDES...` run (a fresh workdir each time). Its eval records (every
`eval_every_steps`), median training images/s, parameter count and wall time go into
`experiments/STUDY/results.json` (runs of other labels/seeds already there are kept, so a
study can be run in parts); then `experiments/STUDY/curves.png` (the study's metric
against step, one line per run), `experiments/STUDY/final.png` (final metric per
variant: mean, with the min-max range over seeds) and `experiments/STUDY/table.md` are
written from that JSON alone. A variant with `reeval` is not trained: it evaluates the
finished run of another variant again with extra overrides (segjax.main only evaluates
when the checkpoint is at num_train_steps), e.g. with the dense CRF switched on.

Studies and what they test are listed in STUDIES and in experiments/README.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import re
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
RESULTS_DIR = HERE  # experiments/STUDY/...; --results_dir moves it (tests, smoke runs)


@dataclasses.dataclass(frozen=True)
class Variant:
  label: str
  config: str
  overrides: tuple[str, ...] = ()
  reeval: str | None = None  # label of the trained variant this one re-evaluates


@dataclasses.dataclass(frozen=True)
class Study:
  title: str
  metric: str  # key of the eval records that the table, curves and bars report
  variants: tuple[Variant, ...]
  extra_metrics: tuple[str, ...] = ()
  default_seeds: tuple[int, ...] = (0,)


# Semantic studies also score a 2-pixel band around label edges (experiments/trimap_eval.py).
SEGM_METRICS = ('miou', 'pixel_accuracy', 'trimap_accuracy@2', 'trimap_miou@2')

# The FCN studies ran on the first stride-1 digit_scenes preset: eighth width, 5,000
# steps, single-scale evaluation. The preset has since moved (quarter width, 3,800 steps,
# three test scales); these overrides keep the recorded FCN tables reproducible.
FCN_STUDY_PRESET = ('--config.model.width_multiplier=0.125', '--config.num_train_steps=5000',
                    '--config.eval.tta.scales=(1.0,)')

STUDIES = {
    # Long et al. 2015, Table 2: FCN-32s < FCN-16s < FCN-8s on VOC 2011 val.
    'fcn_skips': Study(
        'FCN-32s vs FCN-16s vs FCN-8s (first stride-1 digit_scenes preset)', 'miou',
        (Variant('fcn32s', 'configs/fcn32s.py', FCN_STUDY_PRESET),
         Variant('fcn16s', 'configs/fcn16s.py', FCN_STUDY_PRESET),
         Variant('fcn8s', 'configs/fcn8s.py', FCN_STUDY_PRESET)),
        extra_metrics=SEGM_METRICS[1:]),
    # Long et al. 2015 §3.3 / §4.2: in-network upsampling by a deconvolution initialised
    # to bilinear interpolation and learned, against a fixed one and a plain resize.
    'fcn_upsampling': Study(
        'FCN-8s upsampling: bilinear resize vs frozen vs learnable bilinear-initialised '
        'deconvolution', 'miou',
        (Variant('bilinear', 'configs/fcn8s.py',
                 FCN_STUDY_PRESET + ('--config.model.upsampling=bilinear',)),
         Variant('deconv_frozen', 'configs/fcn8s.py',
                 FCN_STUDY_PRESET + ('--config.model.upsampling=deconv_frozen',)),
         Variant('deconv', 'configs/fcn8s.py', FCN_STUDY_PRESET)),  # the preset's upsampling
        extra_metrics=SEGM_METRICS[1:]),
    # DeepLab v1 (Chen et al. 2015) Table 2: DeepLab-LargeFOV (3x3 fc6 at rate 12, 1024
    # channels) matches a 4096x7x7 fc6 (rate 4) at a fraction of the parameters and time.
    # Both heads on the deeplab_heads backbone: the quarter-width VGG-16 of the v1
    # presets stays at the all-background solution (experiments/README.md).
    'deeplab_fc6': Study(
        'DeepLab fc6: 7x7x4096 rate 4 vs LargeFOV 3x3x1024 rate 12 (one ResNet)', 'miou',
        (Variant('fc6_7x7_4096', 'configs/deeplab_v2_7x7.py'),
         Variant('largefov', 'configs/deeplab_v2_largefov.py')),
        extra_metrics=SEGM_METRICS[1:]),
    # DeepLab v2 (Chen et al. 2017) Table 3: ASPP-L > ASPP-S > LargeFOV; v3+ beyond.
    # All four on the same backbone (the presets' eighth-width ResNet-18, stride-2 stem).
    'deeplab_heads': Study(
        'DeepLab heads on one backbone: LargeFOV vs ASPP-S vs ASPP-L vs v3+', 'miou',
        (Variant('largefov', 'configs/deeplab_v2_largefov.py'),
         Variant('aspp_s', 'configs/deeplab_v2_aspp_s.py'),
         Variant('aspp_l', 'configs/deeplab_v2_aspp_l.py'),
         Variant('v3plus', 'configs/deeplab_v3plus.py')),
        extra_metrics=SEGM_METRICS[1:]),
    # DeepLab v1 §4.2 / Fig. 5: the fully connected CRF sharpens boundaries.
    'crf': Study(
        'Dense CRF post-processing (DeepLab v3+ and FCN-8s, same weights)', 'miou',
        (Variant('fcn8s', 'configs/fcn8s.py', FCN_STUDY_PRESET),
         Variant('fcn8s+crf', 'configs/fcn8s.py',
                 FCN_STUDY_PRESET + ('--config.eval.crf.enabled=True',), reeval='fcn8s'),
         Variant('v3plus', 'configs/deeplab_v3plus.py'),
         Variant('v3plus+crf', 'configs/deeplab_v3plus.py', ('--config.eval.crf.enabled=True',),
                 reeval='v3plus')),
        extra_metrics=SEGM_METRICS[1:]),
    # Mask R-CNN (He et al. 2017) Table 2c: RoIAlign beats RoIPool, most on mask AP.
    'roi_pooler': Study(
        'Mask R-CNN: RoIAlign vs RoIPool', 'segm_AP',
        (Variant('roi_align', 'configs/mask_rcnn_r50_fpn.py'),  # the preset's pooler
         Variant('roi_pool', 'configs/mask_rcnn_r50_fpn.py',
                 ('--config.model.roi_pooler=roi_pool',))),
        extra_metrics=('bbox_AP', 'segm_AP50')),
    # Mask Scoring R-CNN (Huang et al. 2019) Table 1: MaskIoU scoring raises mask AP.
    'mask_scoring': Study(
        'Mask R-CNN vs Mask Scoring R-CNN', 'segm_AP',
        (Variant('mask_rcnn', 'configs/mask_rcnn_r50_fpn.py'),
         Variant('ms_rcnn', 'configs/ms_rcnn_r50_fpn.py')),
        extra_metrics=('bbox_AP', 'segm_AP50')),
}

_PARAMS = re.compile(r'from scratch: (\d+) parameters')
_REEVAL = re.compile(r'already trained to step \d+; eval \([\d.]+s\): (.*)$', re.M)


def _run_dir(outdir: str, variant: Variant, seed: int, extra: tuple[str, ...]) -> str:
  """OUTDIR/runs/<config>-<hash of the overrides>-seedS: studies share identical runs."""
  key = json.dumps([variant.config, sorted(variant.overrides + extra)])
  digest = hashlib.sha1(key.encode()).hexdigest()[:10]
  name = os.path.splitext(os.path.basename(variant.config))[0]
  return os.path.join(outdir, 'runs', f'{name}-{digest}-seed{seed}')


def _finished(workdir: str) -> bool:
  """True when a previous identical run finished (it writes done.json last)."""
  return os.path.exists(os.path.join(workdir, 'done.json'))


def run_variant(study: Study, name: str, variant: Variant, seed: int, outdir: str,
                extra: tuple[str, ...] = ()) -> dict:
  """Trains (or re-evaluates) one variant with one seed; returns its result record."""
  if variant.reeval:
    trained = {v.label: v for v in study.variants}[variant.reeval]
    workdir = _run_dir(outdir, trained, seed, extra)
    if not _finished(workdir):
      raise RuntimeError(f'{variant.label} re-evaluates {variant.reeval}, which has no finished '
                         f'run in {workdir}: run {variant.reeval} first')
    log_path = os.path.join(workdir, f'reeval-{variant.label}.log')
  else:
    workdir = _run_dir(outdir, variant, seed, extra)
    log_path = os.path.join(workdir, 'train.log')
  cmd = [sys.executable, '-m', 'segjax.main', f'--config={variant.config}',
         f'--workdir={workdir}', f'--config.seed={seed}', *variant.overrides, *extra]
  print('+', ' '.join(cmd[1:]), flush=True)
  from segjax.train.metric_writer import read_metrics  # pylint: disable=g-import-not-at-top
  if not variant.reeval and _finished(workdir):
    print(f'  (reusing the finished identical run in {workdir})', flush=True)
  else:
    if not variant.reeval:
      subprocess.run(['rm', '-rf', workdir], check=True)
    os.makedirs(workdir, exist_ok=True)
    start = time.time()
    with open(log_path, 'w') as log:
      proc = subprocess.run(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    seconds = time.time() - start
    text = open(log_path).read()
    if proc.returncode != 0:
      raise RuntimeError(f'{variant.label} seed {seed} failed (exit {proc.returncode}); '
                         f'see {log_path}:\n' + text[-2000:])
    if not variant.reeval:
      # The training run's own records, before any re-evaluation appends to metrics.jsonl.
      train = read_metrics(workdir, 'train')
      params = _PARAMS.search(text)
      with open(os.path.join(workdir, 'done.json'), 'w') as f:
        json.dump({'wall_seconds': round(seconds, 1), 'evals': read_metrics(workdir, 'eval'),
                   'train_images_per_second_median': round(statistics.median(
                       r['images_per_second'] for r in train), 1) if train else None,
                   'parameters': int(params.group(1)) if params else None}, f)
  keys = (study.metric,) + study.extra_metrics
  record = {'label': variant.label, 'seed': seed, 'config': variant.config,
            'overrides': list(variant.overrides) + list(extra)}
  if variant.reeval:
    # A finished run only evaluates again and logs the result (metrics.jsonl keeps the
    # training run's records): 'already trained to step N; eval (Ts): k=v k=v ...'.
    found = _REEVAL.findall(text)
    if not found:
      raise RuntimeError(f'no re-evaluation line in {log_path}')
    final = {k: float(v) for k, v in (kv.split('=') for kv in found[-1].split())}
    record.update(reeval_of=variant.reeval, wall_seconds=round(seconds, 1),
                  final={k: v for k, v in final.items() if k in keys})
  else:
    with open(os.path.join(workdir, 'done.json')) as f:
      done = json.load(f)
    evals = done['evals']
    record.update(wall_seconds=done['wall_seconds'],
                  train_images_per_second_median=done['train_images_per_second_median'],
                  parameters=done['parameters'],
                  final={k: v for k, v in evals[-1].items() if k in keys},
                  curve=[{'step': r['step'], **{k: r[k] for k in keys if k in r}} for r in evals])
  if study.metric == 'miou':
    scores = trimap(cmd, workdir, log_path)
    record['final'].update({k: v for k, v in scores.items() if k.startswith('trimap')})
    # The same predictions' whole-image mIoU: a cross-check of the run's own evaluation.
    record['trimap_eval_miou'] = scores['miou']
  return record


def trimap(main_cmd: list[str], workdir: str, log_path: str) -> dict[str, float]:
  """Boundary-band scores of the finished run, with the same config and overrides."""
  out = os.path.join(workdir, 'trimap.json')
  flags = [a for a in main_cmd[3:] if a.startswith('--config')]
  cmd = [sys.executable, os.path.join(HERE, 'trimap_eval.py'), *flags,
         f'--workdir={workdir}', '--widths=1,2,4', f'--json_out={out}']
  with open(log_path, 'a') as log:
    subprocess.run(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, check=True)
  with open(out) as f:
    return json.load(f)


def results_path(name: str) -> str:
  return os.path.join(RESULTS_DIR, name, 'results.json')


def load_results(name: str) -> list[dict]:
  path = results_path(name)
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return json.load(f)['runs']


def save_results(name: str, runs: list[dict]) -> None:
  os.makedirs(os.path.dirname(results_path(name)), exist_ok=True)
  order = {v.label: i for i, v in enumerate(STUDIES[name].variants)}
  runs = sorted(runs, key=lambda r: (order.get(r['label'], len(order)), r['seed']))
  with open(results_path(name), 'w') as f:
    json.dump({'study': name, 'title': STUDIES[name].title, 'runs': runs}, f, indent=1)
    f.write('\n')


def summarize(name: str, runs: list[dict]) -> list[dict]:
  """One row per variant: mean/std/min/max of each metric over its seeds."""
  study = STUDIES[name]
  rows = []
  for v in study.variants:
    mine = [r for r in runs if r['label'] == v.label]
    if not mine:
      continue
    row = {'label': v.label, 'seeds': [r['seed'] for r in mine]}
    for key in (study.metric,) + study.extra_metrics:
      values = [r['final'][key] for r in mine if key in r['final']]
      if values:
        row[key] = (statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0,
                    min(values), max(values))
    for key in ('wall_seconds', 'train_images_per_second_median', 'parameters'):
      values = [r[key] for r in mine if r.get(key) is not None]
      if values:
        row[key] = statistics.mean(values)
    rows.append(row)
  return rows


def markdown_table(name: str, rows: list[dict]) -> str:
  study = STUDIES[name]
  keys = [k for k in (study.metric,) + study.extra_metrics if any(k in r for r in rows)]
  head = ['variant', 'seeds'] + keys + ['parameters', 'train img/s', 'wall s (per run)']
  lines = ['| ' + ' | '.join(head) + ' |', '|' + '---|' * len(head)]
  for r in rows:
    cells = [r['label'], ','.join(map(str, r['seeds']))]
    for k in keys:
      if k not in r:
        cells.append('')
      elif len(r['seeds']) > 1:
        cells.append(f'{r[k][0]:.4f} ± {r[k][1]:.4f}')
      else:
        cells.append(f'{r[k][0]:.4f}')
    cells.append(f"{int(r['parameters']):,}" if 'parameters' in r else '(same weights)')
    cells.append(f"{r['train_images_per_second_median']:.0f}"
                 if 'train_images_per_second_median' in r else '')
    cells.append(f"{r['wall_seconds']:.0f}" if 'wall_seconds' in r else '')
    lines.append('| ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines) + '\n'


def plot(name: str, runs: list[dict]) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  study = STUDIES[name]
  colours = {v.label: f'C{i}' for i, v in enumerate(study.variants)}
  fig, ax = plt.subplots(figsize=(6.4, 4.0))
  for r in runs:
    if r.get('curve'):
      steps = [p['step'] for p in r['curve'] if study.metric in p]
      values = [p[study.metric] for p in r['curve'] if study.metric in p]
      ax.plot(steps, values, marker='o', ms=3, color=colours.get(r['label'], 'k'),
              label=f"{r['label']} (seed {r['seed']})")
  ax.set_xlabel('training step')
  ax.set_ylabel(f'validation {study.metric}')
  ax.set_title(study.title, fontsize=9)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(os.path.join(RESULTS_DIR, name, 'curves.png'), dpi=100)
  plt.close(fig)

  rows = [r for r in summarize(name, runs) if study.metric in r]
  fig, ax = plt.subplots(figsize=(6.4, 4.0))
  xs = range(len(rows))
  means = [r[study.metric][0] for r in rows]
  lower = [r[study.metric][0] - r[study.metric][2] for r in rows]
  upper = [r[study.metric][3] - r[study.metric][0] for r in rows]
  ax.bar(xs, means, yerr=[lower, upper], capsize=4,
         color=[colours[r['label']] for r in rows])
  for x, r in zip(xs, rows):
    ax.text(x, r[study.metric][0], f'{r[study.metric][0]:.3f}', ha='center', va='bottom',
            fontsize=8)
  ax.set_xticks(list(xs), [f"{r['label']}\n({len(r['seeds'])} seed(s))" for r in rows],
                fontsize=8)
  ax.set_ylabel(f'final validation {study.metric}')
  ax.set_title(study.title + '\n(bar: mean over seeds; whisker: min-max)', fontsize=9)
  fig.tight_layout()
  fig.savefig(os.path.join(RESULTS_DIR, name, 'final.png'), dpi=100)
  plt.close(fig)


def write_outputs(name: str, runs: list[dict]) -> str:
  table = markdown_table(name, summarize(name, runs))
  with open(os.path.join(RESULTS_DIR, name, 'table.md'), 'w') as f:
    f.write(table)
  plot(name, runs)
  return table


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('study', choices=sorted(STUDIES))
  parser.add_argument('--outdir', default='/tmp/segjax_studies',
                      help='where the runs\' workdirs and logs go')
  parser.add_argument('--seeds', default=None, help='comma-separated, e.g. 0,1,2')
  parser.add_argument('--only', default=None, help='comma-separated variant labels')
  parser.add_argument('--plot_only', action='store_true',
                      help='only redraw table.md and the PNGs from results.json')
  parser.add_argument('--override', action='append', default=[],
                      help='extra --config.X=Y for every run (e.g. for a quick smoke run)')
  parser.add_argument('--results_dir', default=HERE,
                      help='where STUDY/results.json, table.md and the PNGs go')
  args = parser.parse_args(argv)
  global RESULTS_DIR
  RESULTS_DIR = args.results_dir
  study = STUDIES[args.study]
  runs = load_results(args.study)
  if not args.plot_only:
    seeds = ([int(s) for s in args.seeds.split(',')] if args.seeds
             else list(study.default_seeds))
    labels = [v.label for v in study.variants]
    only = args.only.split(',') if args.only else labels
    unknown = sorted(set(only) - set(labels))
    if unknown:
      parser.error(f'unknown variant(s) {unknown} for {args.study}; valid: {labels}')
    for seed in seeds:
      for v in study.variants:
        if v.label not in only:
          continue
        record = run_variant(study, args.study, v, seed, args.outdir, tuple(args.override))
        # Re-read: another invocation (other seeds) may have saved meanwhile.
        runs = [r for r in load_results(args.study)
                if (r['label'], r['seed']) != (v.label, seed)] + [record]
        save_results(args.study, runs)
        print(json.dumps({k: record[k] for k in ('label', 'seed', 'final', 'wall_seconds')}),
              flush=True)
  if not runs:
    parser.error(f'no results yet for {args.study}: run it without --plot_only first')
  print(write_outputs(args.study, load_results(args.study)))


if __name__ == '__main__':
  main()
