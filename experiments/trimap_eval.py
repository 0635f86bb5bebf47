"""Boundary ("trimap") accuracy of a trained semantic run on its evaluation split.

  python experiments/trimap_eval.py --config=configs/fcn8s.py --workdir=RUN \
      [--config.eval.crf.enabled=True] [--widths=1,2,4] [--json_out=FILE]

Restores RUN's latest checkpoint, predicts every image of `config.dataset.eval_split`
with `segjax.predict.SemanticPredictor` (so `config.eval.tta` / `config.eval.crf`
apply as in evaluation), and prints one JSON object: for each band width w,
`trimap_accuracy@w` and `trimap_miou@w` (segjax.evaluation.boundary), plus the
whole-image `miou` and `pixel_accuracy` of the same predictions as a cross-check
against the run's own evaluation.
"""

from __future__ import annotations

import json

import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags

from segjax import predict
from segjax.data import sources
from segjax.evaluation import boundary, segmentation_metrics

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Config file of the run.',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Run directory (its checkpoints/ is used).')
_WIDTHS = flags.DEFINE_list('widths', ['1', '2', '4'], 'Band widths in pixels.')
_JSON_OUT = flags.DEFINE_string('json_out', None, 'Also write the JSON object here.')
_BATCH = flags.DEFINE_integer('batch_size', 100, 'Images per predicted batch.')


def evaluate(config, workdir: str, widths, batch_size: int = 100) -> dict[str, float]:
  state = predict.restore_state(config, *predict.checkpoint_location(workdir, None))
  model = predict.SemanticPredictor(config, state.replace(opt_state=None), batch_size)
  data = config.dataset
  source = sources.load_data_source(data.name, data.eval_split, data.data_dir)
  num_classes = int(data.num_classes)
  whole = np.zeros((num_classes, num_classes), np.int64)
  bands = {w: np.zeros_like(whole) for w in widths}
  for start in range(0, len(source), batch_size):
    records = [source[i] for i in range(start, min(start + batch_size, len(source)))]
    # Group by padded size: digit_scenes and VOC crops differ only in real datasets.
    by_size = {}
    for r in records:
      size = predict.padded_size(*r[data.image_key].shape[:2], data.eval_pad_size)
      by_size.setdefault(size, []).append(r)
    for group in by_size.values():
      preds = model([r[data.image_key] for r in group])
      for r, pred in zip(group, preds):
        label = np.asarray(r[data.label_key])[..., 0].astype(np.int64)
        whole += boundary.confusion_counts(pred, label, label < num_classes, num_classes)
        for w in widths:
          bands[w] += boundary.boundary_confusion(pred, label, None, num_classes, width=w)
  result = {k: v for k, v in segmentation_metrics.metrics_from_confusion(whole).items()
            if k in ('miou', 'pixel_accuracy')}
  for w, confusion in bands.items():
    for k, v in boundary.boundary_metrics(confusion).items():
      result[f'{k}@{w}'] = v
  return result


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  logging.set_verbosity(logging.WARNING)
  widths = [int(w) for w in _WIDTHS.value]
  result = evaluate(_CONFIG.value, _WORKDIR.value, widths, _BATCH.value)
  text = json.dumps({k: round(v, 5) for k, v in result.items()})
  if _JSON_OUT.value:
    with open(_JSON_OUT.value, 'w') as f:
      f.write(text + '\n')
  print(text)


if __name__ == '__main__':
  flags.mark_flags_as_required(['config', 'workdir'])
  app.run(main)
